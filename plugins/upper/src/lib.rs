//! `upper`: answers with the request in ASCII upper case (`hi` → `HI`), the
//! nbNet demo logic. Non-ASCII bytes pass through unchanged.
//!
//! The answer is computed straight into the host's response buffer
//! (`write_mapped`): no allocation, no intermediate copy.

use nbnet_plugin_api::{export_plugin, Error, InitContext, NoConfig, Plugin, Response};

/// The upper-case plugin; it keeps no state.
#[derive(Default)]
pub struct Upper;

impl Plugin for Upper {
    type Config = NoConfig;

    fn new(_config: NoConfig, _ctx: &InitContext) -> Result<Self, Error> {
        Ok(Upper)
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        response.write_mapped(request, |byte| byte.to_ascii_uppercase())
    }
}

export_plugin!(Upper);

#[cfg(test)]
mod tests {
    use super::*;
    use nbnet_plugin_api::testing::TestHost;

    #[test]
    fn answers_in_ascii_upper_case_and_leaves_other_bytes_alone() {
        let mut host = TestHost::<Upper>::new("").unwrap();
        assert_eq!(host.process(b"hi").unwrap(), b"HI");
        assert_eq!(
            host.process("héllo 1!".as_bytes()).unwrap(),
            "HéLLO 1!".as_bytes()
        );
    }

    #[test]
    fn a_response_over_the_limit_is_refused() {
        let mut host = TestHost::<Upper>::new("").unwrap();
        host.max_response_bytes = 3;
        assert!(host
            .process(b"four")
            .unwrap_err()
            .contains("max_frame_bytes"));
        assert_eq!(host.process(b"ok").unwrap(), b"OK");
    }
}
