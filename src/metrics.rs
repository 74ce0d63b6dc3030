//! Evaluation metrics (btu-spec.md "Evaluation"): clean accuracy and attack success rate.

use serde::Serialize;

/// Accuracy of `pred` against `label`.
pub fn accuracy(pred: &[i64], label: &[i64]) -> f64 {
    if pred.is_empty() {
        return f64::NAN;
    }
    pred.iter().zip(label).filter(|(p, l)| p == l).count() as f64 / pred.len() as f64
}

/// Attack success rate: among samples whose true label is not `target`, the share predicted as
/// `target` (after the trigger was applied to them). `NaN` when there is no such sample.
pub fn attack_success_rate(pred: &[i64], true_label: &[i64], target: i64) -> f64 {
    share(
        pred.iter()
            .zip(true_label)
            .filter(|(_, l)| **l != target)
            .map(|(p, _)| *p == target),
    )
}

/// Share of `true` in `hits`; `NaN` when empty.
fn share(hits: impl Iterator<Item = bool>) -> f64 {
    let (hit, n) = hits.fold((0usize, 0usize), |(h, n), x| (h + x as usize, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        hit as f64 / n as f64
    }
}

/// Trigger flip rate: among samples whose true label is not `target` and that the model
/// classifies correctly *without* the trigger, the share predicted as `target` *with* it. ASR
/// also counts the non-target samples the model gets wrong anyway, so it cannot fall below the
/// model's clean false-positive rate; the flip rate is what the trigger itself does. `NaN` when
/// there is no such sample.
pub fn flip_rate(
    attacked_pred: &[i64],
    clean_pred: &[i64],
    true_label: &[i64],
    target: i64,
) -> f64 {
    share(
        attacked_pred
            .iter()
            .zip(clean_pred)
            .zip(true_label)
            .filter(|((_, c), l)| **l != target && *c == *l)
            .map(|((a, _), _)| *a == target),
    )
}

/// False-negative rate: among samples whose true label is `target`, the share predicted as
/// another label (what a repair costs the target class). `NaN` when there is no such sample.
pub fn false_negative_rate(pred: &[i64], true_label: &[i64], target: i64) -> f64 {
    share(
        pred.iter()
            .zip(true_label)
            .filter(|(_, l)| **l == target)
            .map(|(p, _)| *p != target),
    )
}

/// A paired change of accuracy on the same rows: mean of `after - before` correctness with its
/// 95 % normal-approximation interval.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct PairedChange {
    /// Mean of `after - before` (each 0 or 1): the change of accuracy, in [-1, 1].
    pub delta: f64,
    /// Lower bound of the 95 % interval of `delta`.
    pub ci_low: f64,
    /// Upper bound of the 95 % interval of `delta`.
    pub ci_high: f64,
    /// Rows compared.
    pub rows: usize,
}

/// [`PairedChange`] of two correctness vectors over the same rows.
pub fn paired_change(before: &[bool], after: &[bool]) -> PairedChange {
    let d: Vec<f64> = before
        .iter()
        .zip(after)
        .map(|(b, a)| *a as i32 as f64 - *b as i32 as f64)
        .collect();
    let n = d.len() as f64;
    let mean = d.iter().sum::<f64>() / n.max(1.0);
    let var = d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    let half = 1.959_964 * (var / n.max(1.0)).sqrt();
    PairedChange {
        delta: mean,
        ci_low: mean - half,
        ci_high: mean + half,
        rows: d.len(),
    }
}

/// Confusion matrix `[true][predicted]` over `classes` classes.
pub fn confusion(pred: &[i64], label: &[i64], classes: usize) -> Vec<Vec<u64>> {
    let mut m = vec![vec![0u64; classes]; classes];
    for (p, l) in pred.iter().zip(label) {
        if (*p as usize) < classes && (*l as usize) < classes {
            m[*l as usize][*p as usize] += 1;
        }
    }
    m
}

/// ACC and ASR with their counts.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Scores {
    /// Clean accuracy, in [0, 1].
    pub acc: f64,
    /// Attack success rate, in [0, 1].
    pub asr: f64,
    /// Rows ACC was computed on.
    pub clean_rows: usize,
    /// Rows ASR was computed on.
    pub attacked_rows: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_counts_matches() {
        assert_eq!(accuracy(&[1, 0, 1, 1], &[1, 1, 1, 0]), 0.5);
        assert!(accuracy(&[], &[]).is_nan());
    }

    #[test]
    fn asr_excludes_target_label_samples() {
        // Samples 0 and 1 have the target label 1 and must not count, whatever is predicted.
        let pred = [1, 1, 1, 0, 1];
        let label = [1, 1, 0, 0, 0];
        assert!((attack_success_rate(&pred, &label, 1) - 2.0 / 3.0).abs() < 1e-12);
        assert!(attack_success_rate(&[1, 1], &[1, 1], 1).is_nan());
        assert_eq!(attack_success_rate(&[0, 0, 0], &[0, 0, 1], 1), 0.0);
    }

    #[test]
    fn flip_rate_counts_only_rows_right_without_the_trigger() {
        // Row 0 is target-labelled (ignored); row 1 is wrong without the trigger (ignored, though
        // ASR counts it); rows 2-4 are right without it and two of them flip.
        let label = [1, 0, 0, 0, 0];
        let clean = [1, 1, 0, 0, 0];
        let attacked = [1, 1, 1, 0, 1];
        assert!((flip_rate(&attacked, &clean, &label, 1) - 2.0 / 3.0).abs() < 1e-12);
        assert!((attack_success_rate(&attacked, &label, 1) - 3.0 / 4.0).abs() < 1e-12);
        assert!(flip_rate(&[1], &[1], &[0], 1).is_nan());
    }

    #[test]
    fn false_negatives_and_paired_change_by_hand() {
        // Target 1: rows 0, 1, 2 carry it and row 2 is missed.
        assert!((false_negative_rate(&[1, 1, 0, 0], &[1, 1, 1, 0], 1) - 1.0 / 3.0).abs() < 1e-12);
        // Differences [0, 1, -1, 0]: mean 0, variance 2/3, half-width 1.96 * sqrt(2/3 / 4).
        let c = paired_change(&[true, false, true, true], &[true, true, false, true]);
        let half = 1.959_964 * (2.0f64 / 3.0 / 4.0).sqrt();
        assert!(
            c.delta.abs() < 1e-12 && (c.ci_high - half).abs() < 1e-9 && c.rows == 4,
            "{c:?}"
        );
        // No change at all: a zero-width interval.
        let c = paired_change(&[true, false], &[true, false]);
        assert_eq!((c.delta, c.ci_low, c.ci_high), (0.0, 0.0, 0.0));
    }

    #[test]
    fn confusion_is_true_by_predicted() {
        assert_eq!(
            confusion(&[1, 0, 1], &[1, 1, 0], 2),
            vec![vec![0, 1], vec![1, 1]]
        );
    }
}
