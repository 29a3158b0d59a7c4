//! Shared by the LUKS2 targets: everything `recover` asks of a volume's JSON metadata.

use talos_kms_server::recover::{SEALED_LEN, TOKEN_TYPE, Volume};

/// Lists the tokens and picks the KMS token every way `recover --token` can.
pub fn check(volume: &Volume) {
    let tokens = volume.tokens();
    let mut choices: Vec<Option<u32>> = vec![None, Some(u32::MAX)];
    choices.extend(tokens.iter().map(|(id, _)| Some(*id)));
    for choice in choices {
        // The message is what the operator reads; building it must not panic either.
        match volume.kms_token(choice) {
            Err(error) => drop(error.to_string()),
            Ok(token) => {
                assert_eq!(token.sealed.len(), SEALED_LEN);
                assert!(choice.is_none_or(|id| id == token.id));
                assert!(tokens.contains(&(token.id, TOKEN_TYPE.to_string())));
                // The blob must come from the token of that id, and it must be a KMS token.
                let json = &volume.header.json["tokens"][token.id.to_string()];
                assert_eq!(
                    json["type"], TOKEN_TYPE,
                    "token {} is not a KMS token",
                    token.id
                );
            }
        }
    }
}
