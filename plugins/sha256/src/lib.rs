//! `sha256`: answers with the lowercase hex SHA-256 of the request payload
//! (`abc` → `ba7816bf…15ad`, always 64 bytes). It does real CPU work per
//! request, proportional to the payload size, which makes it a useful plugin
//! for benchmarks: unlike `echo`, the plugin's own time is not negligible.
//!
//! # Config
//!
//! ```toml
//! [[plugins]]
//! name = "sha256"
//! path = "../target/release/libsha256.so"
//! config = { rounds = 1 }   # optional, 1 by default
//! ```
//!
//! `rounds = n` hashes the payload, then hashes the 32-byte binary digest
//! again `n - 1` times, and answers with the last digest: a knob for how much
//! work each request costs in a benchmark, independent of the payload size.

use nbnet_plugin_api::{export_plugin, Error, InitContext, Plugin, Response};
use serde::Deserialize;
use sha2::{Digest, Sha256 as Hasher};

/// Largest `rounds` accepted: about a second of CPU per request already
/// (a 32-byte SHA-256 takes roughly a microsecond), which stalls the worker.
pub const MAX_ROUNDS: u32 = 1_000_000;

/// The plugin's `config` table; unknown keys are refused.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// How many times to hash (see the crate documentation), `1 ..= MAX_ROUNDS`.
    pub rounds: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config { rounds: 1 }
    }
}

/// The SHA-256 plugin.
///
/// It allocates nothing per request: the digest lives in a `[u8; 32]` and
/// its hex text in a fixed `[u8; 64]`, both on the stack, and the hasher is
/// a plain value. The only copy is the host's, into its output buffer.
pub struct Sha256 {
    rounds: u32,
}

impl Plugin for Sha256 {
    type Config = Config;

    fn new(config: Config, _ctx: &InitContext) -> Result<Self, Error> {
        if !(1..=MAX_ROUNDS).contains(&config.rounds) {
            return Err(Error::new(format!(
                "invalid config: rounds = {}: must be between 1 and {MAX_ROUNDS}",
                config.rounds
            )));
        }
        Ok(Sha256 {
            rounds: config.rounds,
        })
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        let mut digest = Hasher::digest(request);
        for _ in 1..self.rounds {
            digest = Hasher::digest(digest);
        }
        response.write(&to_hex(digest.into()))
    }
}

/// Lowercase hex of a 32-byte digest, without allocating.
fn to_hex(digest: [u8; 32]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 64];
    for (pair, byte) in text.chunks_exact_mut(2).zip(digest) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
    text
}

export_plugin!(Sha256);

#[cfg(test)]
mod tests {
    use nbnet_plugin_api::testing::TestHost;

    use super::Sha256;

    fn hash(host: &mut TestHost<Sha256>, request: &[u8]) -> String {
        String::from_utf8(host.process(request).unwrap()).unwrap()
    }

    #[test]
    fn known_vectors() {
        // FIPS 180-2 test vectors.
        let mut host = TestHost::<Sha256>::new("").unwrap();
        assert_eq!(
            hash(&mut host, b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hash(
                &mut host,
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            ),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        assert_eq!(
            hash(&mut host, &vec![b'a'; 1_000_000]),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0"
        );
        // The instance is reused across requests: the same input, the same answer.
        assert_eq!(
            hash(&mut host, b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn rounds_rehash_the_binary_digest() {
        let mut once = TestHost::<Sha256>::new("rounds = 1").unwrap();
        let mut twice = TestHost::<Sha256>::new("rounds = 2").unwrap();
        let first = once.process(b"abc").unwrap();
        let mut binary = [0u8; 32];
        for (i, byte) in binary.iter_mut().enumerate() {
            let pair = std::str::from_utf8(&first[2 * i..2 * i + 2]).unwrap();
            *byte = u8::from_str_radix(pair, 16).unwrap();
        }
        assert_eq!(
            twice.process(b"abc").unwrap(),
            once.process(&binary).unwrap()
        );
    }

    #[test]
    fn config_is_checked() {
        for (config, expected) in [
            ("round = 2", "round"),
            ("rounds = 0", "rounds = 0: must be between 1 and 1000000"),
            ("rounds = 1000001", "must be between"),
            ("rounds = -1", "invalid config"),
        ] {
            let error = TestHost::<Sha256>::new(config).err().expect(config);
            assert!(error.contains(expected), "{config}: {error}");
        }
    }
}
