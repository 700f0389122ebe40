//! `hello`: answers `NAME` with `hello, NAME!`. The greeting is configurable.

use nbnet_plugin_api::{export_plugin, Error, InitContext, Plugin, Response};
use serde::Deserialize;

/// The plugin's `config` table in the nbnet config, deserialized by the SDK.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)] // a misspelt key is an error, not ignored
pub struct Config {
    /// What to greet with; "hello" when the table does not set it.
    #[serde(default = "default_greeting")]
    greeting: String,
}

fn default_greeting() -> String {
    "hello".to_string()
}

/// One instance per worker process.
pub struct Hello {
    greeting: String,
}

impl Plugin for Hello {
    type Config = Config;

    fn new(config: Config, ctx: &InitContext) -> Result<Self, Error> {
        if config.greeting.is_empty() {
            return Err(Error::new("greeting must not be empty"));
        }
        ctx.logger().info(&format!(
            "worker {} greets with {:?}",
            ctx.worker_index(),
            config.greeting
        ));
        Ok(Hello {
            greeting: config.greeting,
        })
    }

    fn process(&mut self, request: &[u8], response: &mut Response) -> Result<(), Error> {
        response.write(self.greeting.as_bytes())?;
        response.write(b", ")?;
        response.write(request)?;
        response.write(b"!")
    }
}

export_plugin!(Hello);

#[cfg(test)]
mod tests {
    use nbnet_plugin_api::testing::TestHost;

    use super::Hello;

    #[test]
    fn greets() {
        let mut host = TestHost::<Hello>::new("").unwrap();
        assert_eq!(host.process(b"world").unwrap(), b"hello, world!");
    }

    #[test]
    fn greeting_comes_from_the_config() {
        let mut host = TestHost::<Hello>::new(r#"greeting = "hi""#).unwrap();
        assert_eq!(host.process(b"you").unwrap(), b"hi, you!");

        let typo = TestHost::<Hello>::new(r#"greting = "hi""#).err().unwrap();
        assert!(typo.contains("unknown field `greting`"), "{typo}");
    }
}
