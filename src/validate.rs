//! Domains of parameters, checked at the edge before any work (design.md: "validate at the edge").
//! Every check names the flag (or config key) and the range it accepts; failures are
//! [`BtuError::Config`] (exit 78). Also the finite-ness checks on what btu writes (exit 65).

use crate::error::{BtuError, Result};

/// Largest learning rate accepted: beyond it every model this tool trains diverges.
pub const MAX_LR: f64 = 1.0;
/// Smallest `--max-len`: `[CLS]`, one token and `[SEP]`.
pub const MIN_MAX_LEN: usize = 3;

/// How a parameter is named to the user: `key("--", "batch-size")` is `--batch-size` (a flag),
/// `key("train.", "batch-size")` is `train.batch_size` (a `btu defend` config key).
pub fn key(prefix: &str, name: &str) -> String {
    if prefix.starts_with("--") {
        format!("{prefix}{name}")
    } else {
        format!("{prefix}{}", name.replace('-', "_"))
    }
}

/// A learning rate: finite, in `(0, MAX_LR]`.
pub fn learning_rate(flag: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 && v <= MAX_LR {
        return Ok(());
    }
    Err(BtuError::config(
        flag,
        format!("{v} is not a learning rate in (0, {MAX_LR}]; give a small positive number such as 2e-5"),
    ))
}

/// Weight decay: finite, in `[0, 1]`.
pub fn weight_decay(flag: &str, v: f64) -> Result<()> {
    if v.is_finite() && (0.0..=1.0).contains(&v) {
        return Ok(());
    }
    Err(BtuError::config(
        flag,
        format!("{v} is not a weight decay in [0, 1]; the default is 0.01"),
    ))
}

/// A count that must be at least `min`.
pub fn at_least(flag: &str, v: usize, min: usize) -> Result<()> {
    if v >= min {
        return Ok(());
    }
    Err(BtuError::config(
        flag,
        format!("{v} is below the minimum {min}"),
    ))
}

/// A fraction in `[0, 1]`.
pub fn fraction(flag: &str, v: f64) -> Result<()> {
    if (0.0..=1.0).contains(&v) {
        return Ok(());
    }
    Err(BtuError::config(
        flag,
        format!("{v} is not a fraction in [0, 1]"),
    ))
}

/// A finite number in `(0, max]`.
pub fn positive(flag: &str, v: f64, max: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 && v <= max {
        return Ok(());
    }
    Err(BtuError::config(
        flag,
        format!("{v} is not a number in (0, {max}]"),
    ))
}

/// `--max-len`: at least [`MIN_MAX_LEN`], at most the model's position table when known.
pub fn max_len(flag: &str, v: usize, max_position: Option<usize>) -> Result<()> {
    if v < MIN_MAX_LEN {
        return Err(BtuError::config(
            flag,
            format!("{v} is too short: a sequence needs [CLS], a token and [SEP] (at least {MIN_MAX_LEN})"),
        ));
    }
    if let Some(m) = max_position.filter(|&m| v > m) {
        return Err(BtuError::config(
            flag,
            format!(
                "{v} exceeds the model's {m} positions (max_position_embeddings); give at most {m}"
            ),
        ));
    }
    Ok(())
}

/// A class label (`--target`) of a model with `classes` classes.
pub fn label(flag: &str, v: i64, classes: usize) -> Result<()> {
    if v >= 0 && (v as u64) < classes as u64 {
        return Ok(());
    }
    Err(BtuError::config(
        flag,
        format!(
            "label {v} is outside the model's {classes} classes (0..{})",
            classes.saturating_sub(1)
        ),
    ))
}

/// An integer from an environment variable, `default` when unset; anything unparsable is 78.
pub fn env_u64(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Err(_) => Ok(default),
        Ok(v) => v.trim().parse::<u64>().map_err(|_| {
            BtuError::config(
                name,
                format!("'{v}' is not a whole number; unset it or give one (default {default})"),
            )
        }),
    }
}

/// Fail with 65 when `values` hold NaN or an infinity: btu never writes non-finite weights or scores.
pub fn finite(what: &str, name: &str, values: impl IntoIterator<Item = f32>) -> Result<()> {
    if let Some((i, v)) = values.into_iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(BtuError::bad_data(
            what,
            format!("{name} holds {v} at index {i}; refusing to write non-finite values (lower the learning rate or check the inputs)"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_reject_what_training_cannot_use() {
        for bad in [f64::NAN, f64::INFINITY, 0.0, -1.0, 1e30] {
            assert_eq!(
                learning_rate("--lr", bad).unwrap_err().exit_code(),
                78,
                "{bad}"
            );
        }
        assert!(learning_rate("--lr", 2e-5).is_ok());
        assert!(weight_decay("--weight-decay", f64::NAN).is_err());
        assert!(weight_decay("--weight-decay", 0.0).is_ok());
        assert!(max_len("--max-len", 1, None).is_err());
        assert!(max_len("--max-len", 600, Some(512)).is_err());
        assert!(max_len("--max-len", 512, Some(512)).is_ok());
        assert!(label("--target", 5, 2).is_err());
        assert!(label("--target", -1, 2).is_err());
        assert!(label("--target", 1, 2).is_ok());
        assert!(at_least("--epochs", 0, 1).is_err());
        let e = finite("m", "w", [1.0, f32::NAN]).unwrap_err();
        assert_eq!(e.exit_code(), 65);
        assert!(e.to_string().contains("index 1"));
    }
}
