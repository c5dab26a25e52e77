//! Value types of the config file: human durations ("5s", "250ms") and
//! strings with `${VAR}` interpolation.

use std::borrow::Cow;
use std::fmt;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::interpolate;

/// A duration written as a human string: "250ms", "5s", "1m 30s".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    pub const fn from_millis(ms: u64) -> Self {
        Duration(std::time::Duration::from_millis(ms))
    }
    pub const fn from_secs(s: u64) -> Self {
        Duration(std::time::Duration::from_secs(s))
    }
    pub fn get(self) -> std::time::Duration {
        self.0
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(f64),
            Text(String),
        }
        let text = match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a duration such as \"500ms\", \"5s\" or \"1m\"")
        })? {
            Raw::Text(t) => interpolate::expand_for_serde::<D>(&t)?,
            Raw::Number(n) => {
                return Err(serde::de::Error::custom(format!(
                    "a duration needs a unit: write \"{n}s\" or \"{n}ms\""
                )));
            }
        };
        if text.trim().starts_with('-') {
            return Err(serde::de::Error::custom(format!(
                "invalid duration {text:?}: a duration cannot be negative"
            )));
        }
        humantime::parse_duration(text.trim())
            .map(Duration)
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid duration {text:?} ({e}); write it like \"500ms\", \"5s\" or \"1m\""
                ))
            })
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A duration such as \"250ms\", \"5s\" or \"1m 30s\".",
            "pattern": "^\\s*([0-9]+\\s*[a-zA-Zµ]+\\s*)+$"
        })
    }
}

/// A string in which `${VAR}` and `${VAR:-default}` are replaced from the
/// environment when the config is read (`$$` is a literal `$`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EnvString(pub String);

impl EnvString {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl From<&str> for EnvString {
    fn from(s: &str) -> Self {
        EnvString(s.to_owned())
    }
}

impl fmt::Display for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        interpolate::expand_for_serde::<D>(&raw).map(EnvString)
    }
}

impl Serialize for EnvString {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl JsonSchema for EnvString {
    fn schema_name() -> Cow<'static, str> {
        "EnvString".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A string; ${VAR} and ${VAR:-default} are replaced from the environment."
        })
    }
}

/// A TCP port: a number, or a string such as "${PORT:-3000}".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Port(pub u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        let n = match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected a port number (1-65535), or a string such as \"${PORT:-3000}\"",
            )
        })? {
            Raw::Number(n) => n,
            Raw::Text(t) => {
                let t = interpolate::expand_for_serde::<D>(&t)?;
                t.trim()
                    .parse::<i64>()
                    .map_err(|_| serde::de::Error::custom(format!("port {t:?} is not a number")))?
            }
        };
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .map(Port)
            .ok_or_else(|| serde::de::Error::custom(format!("port {n} is out of range 1-65535")))
    }
}

impl Serialize for Port {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.0)
    }
}

impl JsonSchema for Port {
    fn schema_name() -> Cow<'static, str> {
        "Port".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A TCP port (1-65535), or a string such as \"${PORT:-3000}\".",
            "anyOf": [
                { "type": "integer", "minimum": 1, "maximum": 65535 },
                { "type": "string" }
            ]
        })
    }
}

/// How many worker processes: a number, or "auto" for the CPUs this process
/// may use (its affinity mask and any cgroup CPU quota).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Workers {
    #[default]
    Auto,
    Count(u16),
}

impl Workers {
    /// Parses the `--workers` flag and the config value alike.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.eq_ignore_ascii_case("auto") {
            return Ok(Workers::Auto);
        }
        match text.parse::<u16>() {
            Ok(n) if n >= 1 => Ok(Workers::Count(n)),
            _ => Err(format!(
                "{text:?} is not a worker count: use a whole number from 1 to 65535, or \"auto\""
            )),
        }
    }

    /// The number of workers to run.
    pub fn resolve(self) -> usize {
        match self {
            Workers::Count(n) => n as usize,
            // std reads the affinity mask and the cgroup v1/v2 CPU quota.
            Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl fmt::Display for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Workers::Auto => f.write_str("auto"),
            Workers::Count(n) => write!(f, "{n}"),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(i64),
            Text(String),
        }
        match Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a number of workers, or \"auto\""))?
        {
            Raw::Number(n) => Workers::parse(&n.to_string()),
            Raw::Text(t) => Workers::parse(&interpolate::expand_for_serde::<D>(&t)?),
        }
        .map_err(serde::de::Error::custom)
    }
}

impl Serialize for Workers {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Workers::Auto => s.serialize_str("auto"),
            Workers::Count(n) => s.serialize_u16(*n),
        }
    }
}

impl JsonSchema for Workers {
    fn schema_name() -> Cow<'static, str> {
        "Workers".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "description": "A worker count, or \"auto\" for the CPUs this process may use (honouring cgroup CPU quotas).",
            "anyOf": [
                { "type": "integer", "minimum": 1, "maximum": 65535 },
                { "const": "auto" }
            ]
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_parse() {
        assert_eq!(Workers::parse("auto"), Ok(Workers::Auto));
        assert_eq!(Workers::parse("4"), Ok(Workers::Count(4)));
        assert!(Workers::parse("0").is_err());
        assert!(Workers::parse("many").is_err());
    }
}

/// A size written as a human string: "512MiB", "1GiB", "300MB".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl Size {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        if self.0.is_multiple_of(1 << 30) && self.0 > 0 {
            write!(f, "{}GiB", self.0 >> 30)
        } else if self.0.is_multiple_of(MIB) && self.0 > 0 {
            write!(f, "{}MiB", self.0 >> 20)
        } else {
            write!(f, "{}B", self.0)
        }
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = interpolate::expand_for_serde::<D>(&String::deserialize(d)?)?;
        if text.trim().starts_with('-') {
            return Err(serde::de::Error::custom(format!(
                "invalid size {text:?}: a size cannot be negative"
            )));
        }
        text.trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| Size(b.as_u64()))
            .map_err(|e| {
                serde::de::Error::custom(format!(
                    "invalid size {text:?} ({e}); write it like \"512MiB\" or \"2GiB\""
                ))
            })
    }
}

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl JsonSchema for Size {
    fn schema_name() -> Cow<'static, str> {
        "Size".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "description": "A size such as \"512MiB\", \"2GiB\" or \"300MB\"."
        })
    }
}
