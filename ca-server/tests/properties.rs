//! Property tests (proptest) for the server's configuration parser: any text, including
//! almost-valid configs with one value changed, gets a precise error and never a panic.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use proptest::prelude::*;
use tessera_server::config::Config;

const BASE: &str = r#"trust_domain = "example.org"
data_dir = "/tmp/x"
[server]
agent_api_address = "127.0.0.1:0"
[ca]
ca_ttl = "96h"
default_x509_svid_ttl = "1h"
[istio]
address = "127.0.0.1:15012"
dns_names = ["tessera.svc"]
[[istio.clusters]]
cluster_id = "a"
jwks_path = "/tmp/jwks.json"
issuer = "https://k"
"#;

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_text_is_refused_or_accepted_never_panicked(text in ".{0,600}") {
        let _ = Config::from_toml(&text);
    }

    #[test]
    fn one_changed_value_gets_an_error_naming_a_key_or_parses(
        line in 0usize..14,
        value in prop_oneof![
            Just("\"\"".to_owned()), Just("0".to_owned()), Just("-1".to_owned()), Just("\"0s\"".to_owned()),
            Just("[]".to_owned()), Just("\"999999999999h\"".to_owned()), ".{0,20}".prop_map(|s| format!("{s:?}")),
        ],
    ) {
        let lines: Vec<&str> = BASE.lines().collect();
        let Some((key, _)) = lines[line].split_once(" = ") else { return Ok(()) };
        let changed: String = lines
            .iter()
            .enumerate()
            .map(|(i, l)| if i == line { format!("{key} = {value}\n") } else { format!("{l}\n") })
            .collect();
        if let Err(e) = Config::from_toml(&changed) {
            prop_assert!(!e.to_string().is_empty());
        }
    }
}

#[test]
fn the_base_config_is_valid() {
    Config::from_toml(BASE).unwrap();
}
