//! `echo`: the smallest useful nbnet plugin — every response is its request.

use nbnet_plugin_api::{export_plugin, Error, InitContext, NoConfig, Plugin, Response};

/// The echo plugin; it keeps no state.
pub struct Echo;

impl Plugin for Echo {
    type Config = NoConfig;

    fn new(_config: NoConfig, _ctx: &InitContext) -> Result<Self, Error> {
        Ok(Echo)
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        response.write(request)
    }
}

export_plugin!(Echo);
