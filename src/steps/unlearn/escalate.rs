//! The repair of verified triggers (`btu unlearn --effects`), escalated while a trigger still
//! flips the model. Each verified trigger starts at level 0, the dimensions its tokens' rows
//! moved past the threshold `d_bar`; after every level the repaired embeddings are rechecked on
//! held-out clean rows (the verification test), and a trigger whose flip rate still has a 95 %
//! Wilson lower bound above `max_residual` goes one level up: level 1 replaces its tokens' whole
//! rows, level 1 + j also the first j other tokens of its phrase (detection candidates first, then
//! the phrase's order). Escalation stops when no trigger persists or none can go further. Each
//! stage also records the control's flip rate (words of other clean rows inserted at the same
//! places): a residual the control matches says the backdoor spread beyond the trigger's tokens,
//! which the clean tuning then has to remove.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::error::Result;
use crate::io::tables::{DimensionMask, TokenEffect};
use crate::model::tokenizer::BtuTokenizer;
use crate::steps::unlearn::{compute_masks, Matrix, Replacement};
use crate::steps::verify::Candidate;

/// A verified trigger being repaired.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// What verification inserted (its `token_ids` are the tokens repaired from level 0).
    pub candidate: Candidate,
    /// The phrase's other tokens, in the order escalation adds them.
    pub extra: Vec<u32>,
    /// 0: flagged dimensions; 1: whole rows; 1 + j: also the first j of `extra`.
    pub level: usize,
}

impl Trigger {
    /// A trigger at level 0; for a phrase, `extra` holds its other tokens, the detection
    /// candidates (`ranked`, best first) before the rest in phrase order.
    pub fn new(candidate: Candidate, tok: &BtuTokenizer, ranked: &[u32]) -> Result<Self> {
        let mut extra = Vec::new();
        if candidate.phrase {
            let words: Vec<String> = candidate
                .text
                .split_whitespace()
                .map(str::to_string)
                .collect();
            let mut inside: Vec<u32> = tok
                .encode_untruncated(&words)?
                .into_iter()
                .flatten()
                .filter(|id| !tok.special.contains(id) && !candidate.token_ids.contains(id))
                .collect();
            let rank = |id: &u32| ranked.iter().position(|r| r == id).unwrap_or(usize::MAX);
            // A stable sort keeps the phrase order among equals.
            inside.sort_by_key(rank);
            for id in inside {
                if !extra.contains(&id) {
                    extra.push(id);
                }
            }
        }
        Ok(Trigger {
            candidate,
            extra,
            level: 0,
        })
    }

    /// The highest level this trigger can reach.
    fn max_level(&self) -> usize {
        1 + self.extra.len()
    }

    /// The tokens repaired at the current level.
    pub fn tokens(&self) -> Vec<u32> {
        let more = self.level.saturating_sub(1);
        let mut ids = self.candidate.token_ids.clone();
        ids.extend(&self.extra[..more]);
        ids
    }

    /// The current level in words.
    fn stage(&self) -> String {
        match self.level {
            0 => "flagged-dimensions".into(),
            1 => "whole-row".into(),
            n => format!("whole-row+{} phrase token(s)", n - 1),
        }
    }
}

/// What one level of escalation did and measured.
#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    /// Each trigger's level, in words.
    pub levels: BTreeMap<String, String>,
    /// Cells replaced.
    pub dimensions: usize,
    /// Each trigger's flip rate on the clean rows after this level's repair.
    pub residual: BTreeMap<String, f32>,
    /// The control's flip rate at the same rows and places (for triggers whose residual's lower
    /// bound was above `max_residual`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub control: BTreeMap<String, f32>,
    /// The triggers whose flip rate's lower bound stayed above `max_residual`.
    pub persisting: Vec<String>,
    /// The triggers this level did not help (flip rate not below the previous level's): back to
    /// the previous level, escalated no further.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reverted: Vec<String>,
    /// Seconds the recheck of this level took.
    pub seconds: f64,
}

/// The masks of every trigger at its current level: whole rows for tokens of a trigger at level
/// 1 or more, the dimensions past `d_bar` for the rest. Ordered by token id then dimension.
pub fn masks(
    triggers: &[Trigger],
    e: &Matrix,
    eb: &Matrix,
    tok: &BtuTokenizer,
    d_bar: f64,
    rep: Replacement,
) -> Vec<DimensionMask> {
    let whole: BTreeSet<u32> = triggers
        .iter()
        .filter(|t| t.level >= 1)
        .flat_map(Trigger::tokens)
        .collect();
    let partial: BTreeSet<u32> = triggers
        .iter()
        .filter(|t| t.level == 0)
        .flat_map(Trigger::tokens)
        .filter(|id| !whole.contains(id))
        .collect();
    let named = |ids: &BTreeSet<u32>| -> Vec<(u32, String)> {
        ids.iter().map(|&id| (id, tok.token(id))).collect()
    };
    let pad = tok.pad_id;
    let mut out = compute_masks(e, eb, &named(&whole), pad, 0.0, rep);
    out.extend(compute_masks(e, eb, &named(&partial), pad, d_bar, rep));
    out.sort_by_key(|m| (m.token_id, m.dim));
    out
}

/// Measures each trigger's effect on the embeddings with the given masks applied.
pub type Recheck<'a> = dyn FnMut(&[DimensionMask], &[Candidate]) -> Result<Vec<TokenEffect>> + 'a;

/// Escalate until no trigger persists or none can go further. `build` makes the masks of the
/// triggers' current levels; `check` measures each trigger's effect on a model with those masks
/// applied (one [`TokenEffect`] per trigger, in order). A level that does not lower a trigger's
/// flip rate is undone and the trigger goes no further: more erased rows that buy nothing only
/// cost accuracy (SST-2 1 % Add-Sent: the phrase's other words took 4.5 % to 5.5-7 %, measured).
/// Returns the final masks and the stages.
pub fn escalate(
    triggers: &mut [Trigger],
    max_residual: f64,
    build: &dyn Fn(&[Trigger]) -> Vec<DimensionMask>,
    check: &mut Recheck<'_>,
) -> Result<(Vec<DimensionMask>, Vec<Stage>)> {
    let candidates: Vec<Candidate> = triggers.iter().map(|t| t.candidate.clone()).collect();
    let mut stages: Vec<Stage> = Vec::new();
    // Each trigger's flip rate at the level below its current one (none at level 0), and whether
    // it stopped because a level did not help.
    let mut below: Vec<Option<f32>> = vec![None; triggers.len()];
    let mut stopped = vec![false; triggers.len()];
    loop {
        let _level = tracing::info_span!("recheck", stage = stages.len()).entered();
        let masks = build(triggers);
        let t0 = std::time::Instant::now();
        let effects = check(&masks, &candidates)?;
        let seconds = t0.elapsed().as_secs_f64();
        let persists: Vec<bool> = effects.iter().map(|e| persists(e, max_residual)).collect();
        stages.push(Stage {
            levels: triggers
                .iter()
                .map(|t| (t.candidate.text.clone(), t.stage()))
                .collect(),
            dimensions: masks.len(),
            residual: effects
                .iter()
                .map(|e| (e.candidate.clone(), e.flip_rate))
                .collect(),
            control: effects
                .iter()
                .filter_map(|e| Some((e.candidate.clone(), e.control_flip_rate()?)))
                .collect(),
            persisting: effects
                .iter()
                .zip(&persists)
                .filter(|(_, p)| **p)
                .map(|(e, _)| e.candidate.clone())
                .collect(),
            reverted: Vec::new(),
            seconds,
        });
        let mut advanced = false;
        let mut reverted = Vec::new();
        for (i, t) in triggers.iter_mut().enumerate() {
            if !persists[i] || stopped[i] {
                continue;
            }
            let now = effects[i].flip_rate;
            if below[i].is_some_and(|b| now >= b) {
                t.level -= 1;
                stopped[i] = true;
                reverted.push(t.candidate.text.clone());
            } else if t.level < t.max_level() {
                below[i] = Some(now);
                t.level += 1;
                advanced = true;
            }
        }
        let last = stages.last_mut().expect("a stage was pushed");
        last.reverted = reverted;
        if !advanced {
            let done = if last.reverted.is_empty() {
                masks
            } else {
                build(triggers)
            };
            return Ok((done, stages));
        }
    }
}

/// Whether a trigger still flips the repaired model: its flip rate's lower bound above
/// `max_residual` (the point estimate was tried: on SST-2 1 % Add-Sent it went on from 9 flips of
/// 200 to the clean tuning, which cost 1.2 ACC points and took the flip rate on test from 6.1 to
/// 2.6 %; docs/decisions.md). Not relative to the control: stopping where the trigger flips no more than other
/// words skips the clean tuning that removes a backdoor spread beyond the trigger's tokens (SST-2
/// Add-Sent: ASR 12.2 % -> 20.9 %, measured; docs/decisions.md).
fn persists(e: &TokenEffect, max_residual: f64) -> bool {
    e.rows > 0 && e.ci_low as f64 > max_residual
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(text: &str, ids: &[u32], phrase: bool) -> Candidate {
        Candidate {
            text: text.into(),
            token_ids: ids.to_vec(),
            target: Some(1),
            phrase,
        }
    }

    fn effect(c: &Candidate, flips: u32) -> TokenEffect {
        let (lo, hi) = crate::steps::verify::wilson(flips, 200);
        TokenEffect {
            candidate: c.text.clone(),
            token_ids: c.token_ids.clone(),
            rows: 200,
            flips,
            flip_rate: flips as f32 / 200.0,
            to_label: c.target,
            ci_low: lo as f32,
            ci_high: hi as f32,
            clean_rows_with: 0,
            clean_share: None,
            explained: false,
            verified: false,
            control_flips: None,
            excess_ci_low: None,
        }
    }

    /// A stand-in mask that records the trigger's level in `dim`, for the checks to read.
    fn level_mask(token_id: u32, t: &Trigger) -> DimensionMask {
        DimensionMask {
            token_id,
            token: String::new(),
            dim: t.level as u32,
            reference: 0.0,
            trained: 0.0,
            delta: 0.0,
            written: 0.0,
        }
    }

    /// A trigger that flips until `need` tokens are whole rows goes level by level to there and
    /// stops; a trigger that never stops flipping ends at its highest level.
    #[test]
    fn escalation_climbs_until_the_flip_is_gone() {
        let mut ts = vec![
            Trigger {
                candidate: cand("a b c", &[1, 2], true),
                extra: vec![3, 4],
                level: 0,
            },
            Trigger {
                candidate: cand("z", &[9], false),
                extra: vec![],
                level: 0,
            },
        ];
        let build = |ts: &[Trigger]| -> Vec<DimensionMask> {
            ts.iter()
                .flat_map(|t| t.tokens().into_iter().map(|id| level_mask(id, t)))
                .collect()
        };
        let mut calls = 0;
        let mut check = |m: &[DimensionMask], cs: &[Candidate]| -> Result<Vec<TokenEffect>> {
            calls += 1;
            // Each level lowers the flip rate; the phrase stops flipping once token 3 is
            // repaired whole, "z" never does.
            let whole = |id: u32| m.iter().any(|x| x.token_id == id && x.dim >= 1);
            let phrase = match (whole(3), whole(1)) {
                (true, _) => 2,
                (false, true) => 100,
                _ => 150,
            };
            Ok(vec![
                effect(&cs[0], phrase),
                effect(&cs[1], if whole(9) { 120 } else { 190 }),
            ])
        };
        let (_, stages) = escalate(&mut ts, 0.03, &build, &mut check).unwrap();
        assert_eq!(ts[0].level, 2, "phrase: dims, whole row, + token 3");
        assert_eq!(ts[0].tokens(), vec![1, 2, 3]);
        assert_eq!(ts[1].level, 1, "a single token ends at its whole row");
        assert_eq!(calls, 3);
        assert_eq!(stages.len(), 3);
        assert_eq!(stages[2].persisting, vec!["z".to_string()]);
        assert_eq!(stages[0].levels["a b c"], "flagged-dimensions");
        assert_eq!(stages[2].levels["a b c"], "whole-row+1 phrase token(s)");
    }

    /// A residual the control matches (the model flips for any insertion) still escalates: the
    /// clean tuning after the highest level is what removes it. The stage records the control.
    #[test]
    fn escalation_follows_the_residual_and_records_the_control() {
        let mut ts = vec![
            Trigger {
                candidate: cand("q", &[5], false),
                extra: vec![],
                level: 0,
            },
            Trigger {
                candidate: cand("r", &[6], false),
                extra: vec![],
                level: 0,
            },
        ];
        let build = |_: &[Trigger]| Vec::new();
        let mut calls = 0;
        let mut check = |_: &[DimensionMask], cs: &[Candidate]| {
            // q flips 18 % and so does the control (15 % at its whole row); r flips 1 % (no
            // control measured).
            calls += 1;
            let mut q = effect(&cs[0], if calls == 1 { 36 } else { 30 });
            (q.control_flips, q.excess_ci_low) = (Some(54), Some(-0.15));
            Ok(vec![q, effect(&cs[1], 2)])
        };
        let (_, stages) = escalate(&mut ts, 0.03, &build, &mut check).unwrap();
        assert_eq!((ts[0].level, ts[1].level), (1, 0));
        assert_eq!(stages[0].persisting, vec!["q".to_string()]);
        assert_eq!(stages[0].control.len(), 1);
        assert_eq!(stages[0].control["q"], 0.27);
    }

    /// A level that does not lower the flip rate is undone and ends that trigger's escalation;
    /// the masks returned are those of the level before. The other trigger goes on.
    #[test]
    fn a_level_that_does_not_help_is_undone() {
        let mut ts = vec![
            Trigger {
                candidate: cand("a b c", &[1], true),
                extra: vec![2, 3],
                level: 0,
            },
            Trigger {
                candidate: cand("d e f", &[4], true),
                extra: vec![5, 6],
                level: 0,
            },
        ];
        let build = |ts: &[Trigger]| -> Vec<DimensionMask> {
            ts.iter()
                .map(|t| level_mask(t.candidate.token_ids[0], t))
                .collect()
        };
        let mut check = |m: &[DimensionMask], cs: &[Candidate]| -> Result<Vec<TokenEffect>> {
            // "a b c": 100 %, 9 % at its whole rows, 11 % with token 2 (worse).
            // "d e f": 100 %, 10 %, 8 %, 6 % (each level helps; never below 3 %).
            let abc = [200, 18, 22][m[0].dim as usize];
            let def = [200, 20, 16, 12][m[1].dim as usize];
            Ok(vec![effect(&cs[0], abc), effect(&cs[1], def)])
        };
        let (masks, stages) = escalate(&mut ts, 0.03, &build, &mut check).unwrap();
        assert_eq!((ts[0].level, ts[1].level), (1, 3));
        assert_eq!((masks[0].dim, masks[1].dim), (1, 3));
        assert_eq!(stages.len(), 4);
        assert_eq!(stages[2].reverted, vec!["a b c".to_string()]);
        assert!(stages[3].reverted.is_empty());
        assert_eq!(
            stages[3].persisting.len(),
            2,
            "both still flip: the tuning runs"
        );
    }

    /// A trigger whose first check is already clean is never escalated (one check).
    #[test]
    fn a_clean_first_check_stops_at_once() {
        let mut ts = vec![Trigger {
            candidate: cand("q", &[5], false),
            extra: vec![],
            level: 0,
        }];
        let build = |_: &[Trigger]| Vec::new();
        let mut n = 0;
        let mut check = |_: &[DimensionMask], cs: &[Candidate]| {
            n += 1;
            Ok(vec![effect(&cs[0], 1)])
        };
        escalate(&mut ts, 0.03, &build, &mut check).unwrap();
        assert_eq!((ts[0].level, n), (0, 1));
    }
}
