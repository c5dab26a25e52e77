//! `${VAR}` and `${VAR:-default}` interpolation in config string values.
//!
//! Values are expanded while serde reads them, so an error (a variable that is
//! not set and has no default) is reported by the parser at the value's line
//! and column. The variables come from [`with_vars`], set around one parse.

use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    static VARS: RefCell<Option<HashMap<String, String>>> = const { RefCell::new(None) };
}

/// Runs `f` with `vars` as the variables that `${...}` sees.
pub fn with_vars<T>(vars: HashMap<String, String>, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            VARS.with(|v| v.borrow_mut().take());
        }
    }
    VARS.with(|v| *v.borrow_mut() = Some(vars));
    let _reset = Reset;
    f()
}

fn lookup(name: &str) -> Option<String> {
    VARS.with(|v| match &*v.borrow() {
        Some(vars) => vars.get(name).cloned(),
        None => std::env::var(name).ok(),
    })
}

/// Expands `text`, reporting failures as a serde error of the value.
pub fn expand_for_serde<'de, D: serde::Deserializer<'de>>(text: &str) -> Result<String, D::Error> {
    expand(text, lookup).map_err(serde::de::Error::custom)
}

/// Expands `${NAME}`, `${NAME:-default}` and `$$` in `text`.
pub fn expand(text: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    if !text.contains('$') {
        return Ok(text.to_owned());
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(body) = after.strip_prefix('{') {
            let end = body
                .find('}')
                .ok_or_else(|| format!("unclosed \"${{\" in {text:?}"))?;
            let expr = &body[..end];
            let (name, default) = match expr.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (expr, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!(
                    "\"${{{expr}}}\" is not a variable reference: write ${{NAME}} or ${{NAME:-default}}"
                ));
            }
            match (lookup(name), default) {
                (Some(v), Some(d)) if v.is_empty() => out.push_str(d),
                (Some(v), _) => out.push_str(&v),
                (None, Some(d)) => out.push_str(d),
                (None, None) => {
                    return Err(format!(
                        "environment variable {name} is not set; set it, or give a default: ${{{name}:-value}}"
                    ));
                }
            }
            rest = &body[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("10.0.0.1".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_and_default() {
        assert_eq!(expand("${HOST}:1", env).unwrap(), "10.0.0.1:1");
        assert_eq!(expand("${NOPE:-x}", env).unwrap(), "x");
        assert_eq!(expand("${EMPTY:-d}", env).unwrap(), "d");
        assert_eq!(expand("a$$b $c", env).unwrap(), "a$b $c");
        assert_eq!(expand("${NOPE:-}", env).unwrap(), "");
    }

    #[test]
    fn missing_without_default_names_the_variable() {
        let err = expand("${NOPE}", env).unwrap_err();
        assert!(err.contains("NOPE is not set"), "{err}");
        assert!(expand("${unclosed", env).is_err());
        assert!(expand("${bad name}", env).is_err());
    }
}
