//! Session tickets every worker can open, before and after a reload.
//!
//! rustls' own `Ticketer` makes a random key in the process that builds it
//! and rotates it every 6 h from a random source in *each* process: built
//! by the master it changed on every reload (no client resumed after a
//! no-op `nbnet reload`), and after the first rotation, inside each
//! worker, a ticket issued by one worker was refused by the others.
//!
//! Here the master makes one random 32-byte secret, once per master
//! process, the first time it loads a config with TLS (before any worker
//! is forked, so every worker inherits it), and keeps it across reloads.
//! The key of time period `n` (`n` = unix time / 6 h) is
//! HKDF-SHA256(secret, info = "nbnet ticket" ‖ listener context ‖ n):
//! every worker computes the same keys from the same secret and clock
//! without talking to anyone. A ticket is
//! `n (u32, big endian) ‖ 12-byte random nonce ‖ AES-256-GCM(plaintext)`,
//! the first 16 bytes authenticated too; one is accepted in its period and
//! the next (a ticket lives 6 h at most), nothing else.
//!
//! The listener context is a digest of who the listener lets in (its
//! client CAs, or none): rustls does not check on resumption that the
//! session's client certificate would still be accepted, so a session
//! made on a listener without mutual TLS (or with another CA) must never
//! open on a listener that asks for a client certificate. A changed
//! `client_ca` file ends the sessions made under the old one.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;

/// How long a key is used to issue tickets, and a ticket's lifetime.
pub const PERIOD_SECS: u64 = 6 * 60 * 60;

/// The bytes before the sealed plaintext: the period and the nonce.
const HEADER_LEN: usize = 4 + NONCE_LEN;

/// The master's secret: made once per process, kept across reloads.
static SECRET: OnceLock<[u8; 32]> = OnceLock::new();

/// The process's ticket secret, made on first use (in the master, when it
/// first loads a config with TLS: before any fork).
fn secret() -> Result<&'static [u8; 32], String> {
    if let Some(secret) = SECRET.get() {
        return Ok(secret);
    }
    let mut fresh = [0u8; 32];
    SystemRandom::new()
        .fill(&mut fresh)
        .map_err(|_| "the system's random source failed".to_string())?;
    Ok(SECRET.get_or_init(|| fresh))
}

/// Who a listener lets in, as bytes for the key derivation: a SHA-256 of
/// its client CA certificates (DER), or a fixed value without mutual TLS.
pub fn context(client_cas: Option<&[CertificateDer<'_>]>) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    match client_cas {
        None => ctx.update(b"no client certificate"),
        Some(cas) => {
            ctx.update(b"client certificate from");
            for ca in cas {
                ctx.update(&(ca.len() as u64).to_be_bytes());
                ctx.update(ca);
            }
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// A derived key and the period it is for.
type PeriodKey = Option<(u32, Arc<LessSafeKey>)>;

/// The ticket producer of one listener (see the module documentation).
pub struct Ticketer {
    prk: hkdf::Prk,
    context: [u8; 32],
    rng: SystemRandom,
    /// The keys of the two most recent periods used, so a handshake runs
    /// no HKDF (they change every 6 h).
    keys: Mutex<[PeriodKey; 2]>,
}

impl std::fmt::Debug for Ticketer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticketer").finish_non_exhaustive()
    }
}

impl Ticketer {
    /// The ticketer of a listener whose [`context`] is `context`, keyed by
    /// the master's secret.
    pub fn for_listener(
        context: [u8; 32],
    ) -> Result<Arc<dyn rustls::server::ProducesTickets>, String> {
        Ok(Arc::new(Ticketer::with_secret(secret()?, context)))
    }

    fn with_secret(secret: &[u8; 32], context: [u8; 32]) -> Ticketer {
        Ticketer {
            prk: hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(secret),
            context,
            rng: SystemRandom::new(),
            keys: Mutex::new([None, None]),
        }
    }

    /// The key of `period`, derived once and then cached.
    fn key(&self, period: u32) -> Option<Arc<LessSafeKey>> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, key)) = keys.iter().flatten().find(|(p, _)| *p == period) {
            return Some(key.clone());
        }
        let number = period.to_be_bytes();
        let info: [&[u8]; 3] = [b"nbnet ticket", &self.context, &number];
        let okm = self.prk.expand(&info, &AES_256_GCM).ok()?;
        let key = Arc::new(LessSafeKey::new(UnboundKey::from(okm)));
        // Replace the empty slot, else the older period's key.
        let slot = match *keys {
            [None, _] => 0,
            [_, None] => 1,
            [Some((a, _)), Some((b, _))] => usize::from(b < a),
        };
        keys[slot] = Some((period, key.clone()));
        Some(key)
    }

    fn encrypt_at(&self, plain: &[u8], now: u64) -> Option<Vec<u8>> {
        let period = u32::try_from(now / PERIOD_SECS).ok()?;
        let key = self.key(period)?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(HEADER_LEN + plain.len() + AES_256_GCM.tag_len());
        ticket.extend_from_slice(&period.to_be_bytes());
        ticket.extend_from_slice(&nonce);
        let mut sealed = plain.to_vec();
        key.seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&ticket[..HEADER_LEN]),
            &mut sealed,
        )
        .ok()?;
        ticket.extend_from_slice(&sealed);
        Some(ticket)
    }

    fn decrypt_at(&self, ticket: &[u8], now: u64) -> Option<Vec<u8>> {
        if ticket.len() < HEADER_LEN + AES_256_GCM.tag_len() {
            return None;
        }
        let (header, sealed) = ticket.split_at(HEADER_LEN);
        let period = u32::from_be_bytes(header[..4].try_into().ok()?);
        let current = u32::try_from(now / PERIOD_SECS).ok()?;
        if period != current && Some(period) != current.checked_sub(1) {
            return None;
        }
        let nonce = Nonce::try_assume_unique_for_key(&header[4..]).ok()?;
        let key = self.key(period)?;
        let mut plain = sealed.to_vec();
        let len = key
            .open_in_place(nonce, Aad::from(header), &mut plain)
            .ok()?
            .len();
        plain.truncate(len);
        Some(plain)
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl rustls::server::ProducesTickets for Ticketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        PERIOD_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.encrypt_at(plain, now())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.decrypt_at(cipher, now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: [u8; 32] = [7; 32];
    const NOW: u64 = 1_750_000_000;

    fn ticketer() -> Ticketer {
        Ticketer::with_secret(&SECRET, context(None))
    }

    #[test]
    fn a_ticket_opens_to_what_was_sealed() {
        let t = ticketer();
        let ticket = t.encrypt_at(b"session state", NOW).unwrap();
        assert_eq!(ticket.len(), HEADER_LEN + 13 + 16);
        assert_eq!(t.decrypt_at(&ticket, NOW).unwrap(), b"session state");
        // An empty plaintext too.
        let empty = t.encrypt_at(b"", NOW).unwrap();
        assert_eq!(t.decrypt_at(&empty, NOW).unwrap(), b"");
        // Two tickets of the same state differ (random nonces).
        assert_ne!(ticket, t.encrypt_at(b"session state", NOW).unwrap());
    }

    #[test]
    fn the_previous_period_is_accepted_older_and_future_ones_are_not() {
        let t = ticketer();
        let ticket = t.encrypt_at(b"s", NOW).unwrap();
        assert!(t.decrypt_at(&ticket, NOW + PERIOD_SECS).is_some());
        assert!(t.decrypt_at(&ticket, NOW + 2 * PERIOD_SECS).is_none());
        assert!(t.decrypt_at(&ticket, NOW - PERIOD_SECS).is_none());
        // The same from a fresh ticketer (nothing cached).
        assert!(ticketer().decrypt_at(&ticket, NOW + PERIOD_SECS).is_some());
        assert!(ticketer()
            .decrypt_at(&ticket, NOW + 2 * PERIOD_SECS)
            .is_none());
    }

    #[test]
    fn a_changed_period_field_is_refused() {
        // Moving a ticket into the current period does not make its key
        // the current one: the period is authenticated.
        let t = ticketer();
        let mut ticket = t.encrypt_at(b"s", NOW).unwrap();
        let next = (NOW / PERIOD_SECS + 1) as u32;
        ticket[..4].copy_from_slice(&next.to_be_bytes());
        assert!(t.decrypt_at(&ticket, NOW + PERIOD_SECS).is_none());
    }

    #[test]
    fn tampered_short_and_garbage_tickets_are_refused() {
        let t = ticketer();
        let ticket = t.encrypt_at(b"session state", NOW).unwrap();
        for i in 0..ticket.len() {
            let mut bad = ticket.clone();
            bad[i] ^= 0x01;
            assert!(t.decrypt_at(&bad, NOW).is_none(), "byte {i} flipped");
        }
        for len in 0..ticket.len() {
            assert!(t.decrypt_at(&ticket[..len], NOW).is_none(), "{len} bytes");
        }
        let mut longer = ticket.clone();
        longer.push(0);
        assert!(t.decrypt_at(&longer, NOW).is_none());
        // Garbage of every length up to a few hundred bytes, including
        // ones that carry the current period.
        let period = ((NOW / PERIOD_SECS) as u32).to_be_bytes();
        for len in 0..300usize {
            let mut garbage: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            if len >= 4 {
                garbage[..4].copy_from_slice(&period);
            }
            assert!(t.decrypt_at(&garbage, NOW).is_none());
        }
        // Clocks before 1970 or past the u32 periods: no panic, no ticket.
        assert!(t.decrypt_at(&ticket, 0).is_none());
        assert!(t.encrypt_at(b"s", u64::MAX).is_none());
        assert!(t.decrypt_at(&ticket, u64::MAX).is_none());
    }

    #[test]
    fn two_ticketers_from_one_secret_agree_like_two_workers() {
        let a = ticketer();
        let b = ticketer();
        let from_a = a.encrypt_at(b"made on worker a", NOW).unwrap();
        let from_b = b.encrypt_at(b"made on worker b", NOW + 1).unwrap();
        assert_eq!(b.decrypt_at(&from_a, NOW + 2).unwrap(), b"made on worker a");
        assert_eq!(a.decrypt_at(&from_b, NOW + 2).unwrap(), b"made on worker b");
        // Another secret (another master) opens neither.
        let other = Ticketer::with_secret(&[8; 32], context(None));
        assert!(other.decrypt_at(&from_a, NOW).is_none());
    }

    #[test]
    fn a_listener_with_other_client_cas_opens_no_ticket_of_another() {
        let ca = CertificateDer::from(vec![1u8, 2, 3]);
        let other_ca = CertificateDer::from(vec![1u8, 2, 4]);
        let open = ticketer();
        let mutual = Ticketer::with_secret(&SECRET, context(Some(std::slice::from_ref(&ca))));
        let mutual_other = Ticketer::with_secret(&SECRET, context(Some(&[other_ca])));
        let from_open = open.encrypt_at(b"no client certificate", NOW).unwrap();
        assert!(mutual.decrypt_at(&from_open, NOW).is_none());
        let from_mutual = mutual.encrypt_at(b"client certificate", NOW).unwrap();
        assert!(mutual_other.decrypt_at(&from_mutual, NOW).is_none());
        assert!(open.decrypt_at(&from_mutual, NOW).is_none());
        // The same CA (a reload that kept the file): the same keys.
        let mutual_again = Ticketer::with_secret(&SECRET, context(Some(&[ca])));
        assert!(mutual_again.decrypt_at(&from_mutual, NOW).is_some());
    }

    #[test]
    fn the_key_cache_keeps_the_two_latest_periods() {
        let t = ticketer();
        let p = (NOW / PERIOD_SECS) as u32;
        let k0 = t.key(p).unwrap();
        let k1 = t.key(p + 1).unwrap();
        assert!(Arc::ptr_eq(&k0, &t.key(p).unwrap()), "derived twice");
        let _k2 = t.key(p + 2).unwrap();
        assert!(
            Arc::ptr_eq(&k1, &t.key(p + 1).unwrap()),
            "evicted the newer"
        );
        assert!(!Arc::ptr_eq(&k0, &t.key(p).unwrap()), "kept three");
    }

    #[test]
    fn the_process_secret_is_made_once() {
        assert_eq!(secret().unwrap(), secret().unwrap());
    }
}
