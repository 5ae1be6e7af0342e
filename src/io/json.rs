//! JSON side files and headers parsed strictly: a key that appears twice in any object is
//! an error naming the key (serde_json alone keeps the last one silently, so a file with
//! two `weight_map` entries or two `__metadata__` values would mean whatever the last says).

use crate::error::{Error, Result};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use std::collections::HashSet;
use std::path::Path;

/// Walks any JSON value, failing on the first object with a repeated key.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> std::result::Result<UniqueKeys, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key.clone()) {
                return Err(de::Error::custom(format!("key `{}` appears twice", super::fs::escape(&key, 200))));
            }
            map.next_value::<UniqueKeys>()?;
        }
        Ok(UniqueKeys)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_bool<E>(self, _: bool) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_i64<E>(self, _: i64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_u64<E>(self, _: u64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_f64<E>(self, _: f64) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_str<E>(self, _: &str) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
    fn visit_unit<E>(self) -> std::result::Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }
}

/// Parses `text` as JSON, refusing repeated keys; the error is serde_json's message
/// (with line and column).
pub fn parse_unique_text(text: &str) -> std::result::Result<serde_json::Value, String> {
    serde_json::from_str::<UniqueKeys>(text).map_err(|e| e.to_string())?;
    serde_json::from_str(text).map_err(|e| e.to_string())
}

/// [`parse_unique_text`], errors naming `path`.
pub fn parse_unique(text: &str, path: Option<&Path>) -> Result<serde_json::Value> {
    parse_unique_text(text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))
}

/// [`parse_unique`] on a regular file of at most [`super::fs::MAX_TEXT_FILE_BYTES`].
pub fn read_unique(path: &Path) -> Result<serde_json::Value> {
    let text = super::fs::read_text(path, super::fs::MAX_TEXT_FILE_BYTES)?;
    parse_unique(&text, Some(path))
}
