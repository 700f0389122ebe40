//! `upper`: answers with the request in ASCII upper case (`hi` → `HI`), the
//! nbNet demo logic. Non-ASCII bytes pass through unchanged.

use nbnet_plugin_api::{export_plugin, Error, InitContext, NoConfig, Plugin, Response};

/// The upper-case plugin. It keeps one scratch buffer per worker so that a
/// request costs no allocation once the buffer has grown to the largest size seen.
#[derive(Default)]
pub struct Upper {
    scratch: Vec<u8>,
}

impl Plugin for Upper {
    type Config = NoConfig;

    fn new(_config: NoConfig, _ctx: &InitContext) -> Result<Self, Error> {
        Ok(Upper::default())
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        self.scratch.clear();
        self.scratch.extend_from_slice(request);
        self.scratch.make_ascii_uppercase();
        response.write(&self.scratch)
    }
}

export_plugin!(Upper);
