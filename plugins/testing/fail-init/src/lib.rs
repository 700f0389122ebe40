//! Test-only plugin: its `new` always fails, with a message the tests look for.
//! It lets the tests check that a plugin whose init fails stops the server
//! from starting, promptly and with one clear line.

use nbnet_plugin_api::{export_plugin, Error, InitContext, Plugin, Response};

/// Optional config: the message to fail with.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_reason")]
    reason: String,
}

fn default_reason() -> String {
    "fail_init always refuses to start".to_string()
}

/// The plugin that never starts.
pub struct FailInit;

impl Plugin for FailInit {
    type Config = Config;

    fn new(config: Config, _ctx: &InitContext) -> Result<Self, Error> {
        Err(Error::new(config.reason))
    }

    fn process(&mut self, _request: &[u8], _response: &mut Response) -> Result<(), Error> {
        Err(Error::new("unreachable: init never succeeds"))
    }
}

export_plugin!(FailInit);
