//! The configuration loader (`config::Config::from_yaml`) on arbitrary text (bytes that are
//! not UTF-8 are replaced, as a file read lossily would be). It must not panic; a refusal lists
//! at least one problem and every problem says something; a configuration it accepts has no
//! problem, and written back as YAML it loads again as the same configuration.
#![no_main]

use balancer_agent::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    match Config::from_yaml(&text, "fuzz.yaml") {
        Err(e) => {
            assert!(!e.problems.is_empty(), "refused without a problem");
            assert!(e.problems.iter().all(|p| !p.trim().is_empty()));
            assert!(e.to_string().starts_with("fuzz.yaml: "));
        }
        Ok(c) => {
            assert_eq!(c.problems(), Vec::<String>::new());
            let yaml = serde_yaml::to_string(&c).expect("a configuration serializes");
            // `${NAME}` in a value would be expanded on the way back in.
            if !yaml.contains("${") {
                let again = Config::from_yaml(&yaml, "again.yaml")
                    .unwrap_or_else(|e| panic!("{yaml}\nloads no more: {e}"));
                assert_eq!(again, c);
            }
        }
    }
});
