//! The config file: `Config::parse` on any text, as `Config::read` hands it over once the
//! bytes are UTF-8. The README promises that config errors never quote `serverKeyPassword`,
//! so every input carries a known password line among fuzzed text, and neither an error nor
//! a parsed config's Debug output may contain the password.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;
use talos_kms_server::config::Config;

/// Passwords of the shapes YAML treats differently: a word, a number, text that needs quotes.
const PASSWORDS: [&str; 4] = [
    "s3cret-Pa55word",
    "86753091",
    "p@ss: w#rd, [x]",
    "correct horse battery staple",
];

fuzz_target!(|data: &[u8]| {
    let [selector, split, rest @ ..] = data else {
        return;
    };
    // Config::read rejects invalid UTF-8 (read_to_string) before parsing.
    let Ok(fuzzed) = std::str::from_utf8(rest) else {
        return;
    };
    let password = PASSWORDS[usize::from(selector & 3)];
    let line = match (selector >> 2) & 3 {
        0 => format!("serverKeyPassword: {password}"),
        1 => format!("serverKeyPassword: \"{password}\""),
        2 => format!("serverKeyPassword: '{password}'"),
        _ => format!("serverKeyPassword:\n  \"{password}\""),
    };
    // Where the line goes among the fuzzed text, and whether it gets lines of its own.
    let mut at = usize::from(*split) * fuzzed.len() / 255;
    while !fuzzed.is_char_boundary(at) {
        at -= 1;
    }
    let (before, after) = fuzzed.split_at(at);
    let newline = if selector & 16 == 0 { "\n" } else { "" };
    let text = format!("{before}{newline}{line}{newline}{after}");

    let path = Path::new("/etc/talos-kms-server/config.yaml");
    let result = Config::parse(path, &text);
    // Text the fuzzer wrote itself may be quoted, and so may the line once fuzzed text has
    // made it part of another value or a key (a broken quote above it): the YAML then holds
    // no password, and the operator sees what they wrote. The password the YAML holds, never.
    if fuzzed.contains(password) || !holds_password(&text, password) {
        return;
    }
    let shown = match result {
        Err(error) => error,
        Ok(config) => format!("{config:?}"),
    };
    assert!(
        !shown.contains(password),
        "the password {password:?} is quoted: {shown}\n--- config:\n{text}"
    );
});

/// The keys of the config that matter here, read by the same YAML deserializer.
#[derive(serde::Deserialize)]
struct Probe {
    #[serde(rename = "serverKeyPassword")]
    password: Option<serde_json::Value>,
}

/// Whether `text` is YAML whose `serverKeyPassword` is `password`, as a string or a number.
/// Malformed YAML is left out: a leak would show in well-formed text too.
fn holds_password(text: &str, password: &str) -> bool {
    match serde_saphyr::from_str::<Probe>(text) {
        Ok(Probe {
            password: Some(serde_json::Value::String(value)),
        }) => value == password,
        Ok(Probe {
            password: Some(other),
        }) => other.to_string() == password,
        _ => false,
    }
}
