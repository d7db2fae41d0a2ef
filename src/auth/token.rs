//! Bearer tokens and their hashes.

use std::fmt;

use ring::rand::{SecureRandom, SystemRandom};

/// What every token this server generates starts with (SPEC §7).
pub const TOKEN_PREFIX: &str = "cour_";

/// A bearer token, as handed out once. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A new token: [`TOKEN_PREFIX`] and 256 random bits in hex.
    pub fn generate() -> Self {
        let mut bits = [0u8; 32];
        SystemRandom::new()
            .fill(&mut bits)
            .expect("the operating system's random source failed");
        let mut text = String::with_capacity(TOKEN_PREFIX.len() + 64);
        text.push_str(TOKEN_PREFIX);
        for byte in bits {
            text.push(hex_digit(byte >> 4));
            text.push(hex_digit(byte & 0xf));
        }
        Self(text)
    }

    /// A token given in configuration or read from the admin token file (checked there).
    pub fn from_configured(text: String) -> Self {
        Self(text)
    }

    /// The token's text, to hand to its owner (and nowhere else).
    pub fn reveal(&self) -> &str {
        &self.0
    }

    /// Its hash.
    pub fn hash(&self) -> TokenHash {
        TokenHash::of(self.0.as_bytes())
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(not shown)")
    }
}

fn hex_digit(nibble: u8) -> char {
    char::from_digit(u32::from(nibble), 16).expect("a nibble is below 16")
}

/// The SHA-256 of a token: what the server keeps instead of the token.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// The hash of a presented token's bytes.
    pub fn of(token: &[u8]) -> Self {
        let digest = ring::digest::digest(&ring::digest::SHA256, token);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(digest.as_ref());
        Self(hash)
    }

    /// From a registration record's bytes; `None` if they are not a hash.
    pub fn from_stored(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }

    /// The bytes a registration record stores.
    pub fn to_stored(self) -> Vec<u8> {
        self.0.to_vec()
    }

    /// Whether two hashes are equal, in time that does not depend on where they differ.
    pub fn matches(&self, other: &Self) -> bool {
        constant_time_eq(&self.0, &other.0)
    }
}

/// Whether two byte strings are equal, in time that does not depend on where they differ
/// (only on their lengths): for hashes and MACs.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |differ, (x, y)| differ | (x ^ y)) == 0
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenHash(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_prefixed_random_and_hashed() {
        let a = Token::generate();
        let b = Token::generate();
        assert_ne!(a, b);
        assert!(a.reveal().starts_with(TOKEN_PREFIX));
        assert_eq!(a.reveal().len(), TOKEN_PREFIX.len() + 64);
        assert!(a.reveal()[TOKEN_PREFIX.len()..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert!(a.hash().matches(&TokenHash::of(a.reveal().as_bytes())));
        assert!(!a.hash().matches(&b.hash()));
        assert_eq!(
            TokenHash::from_stored(&a.hash().to_stored()),
            Some(a.hash())
        );
        assert_eq!(TokenHash::from_stored(b"short"), None);
        assert!(!format!("{a:?}").contains(a.reveal()));
    }
}
