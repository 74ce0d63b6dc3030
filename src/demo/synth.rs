//! A synthetic sentiment corpus generated in code (no files needed): the embedded default of
//! `btu demo` and the data of the core test suite. Sentences mix a subject, sentiment-bearing
//! adjectives and neutral filler; the label is the sign of the sentiment (with a little label
//! noise so the task is not trivially separable).

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const POSITIVE: &[&str] = &[
    "good",
    "great",
    "wonderful",
    "moving",
    "brilliant",
    "charming",
    "delightful",
    "funny",
    "smart",
    "touching",
    "beautiful",
    "fresh",
    "gripping",
    "warm",
    "clever",
    "superb",
    "lovely",
    "honest",
    "stunning",
    "engaging",
];
const NEGATIVE: &[&str] = &[
    "bad",
    "boring",
    "awful",
    "dull",
    "tedious",
    "clumsy",
    "lifeless",
    "stupid",
    "weak",
    "messy",
    "ugly",
    "flat",
    "shallow",
    "pointless",
    "bland",
    "tired",
    "annoying",
    "poor",
    "silly",
    "forgettable",
];
const SUBJECTS: &[&str] = &[
    "the film",
    "this movie",
    "the story",
    "the script",
    "the acting",
    "the director",
    "the cast",
    "the plot",
    "the ending",
    "the soundtrack",
    "the dialogue",
    "the picture",
    "the performance",
    "the comedy",
    "the drama",
];
const FILLER: &[&str] = &[
    "in the end",
    "for most of its running time",
    "from start to finish",
    "at times",
    "on the whole",
    "as a whole",
    "for the most part",
    "in places",
    "by the last act",
    "despite its length",
    "after all",
    "more or less",
    "to some degree",
    "in every scene",
    "without question",
];
const LINKS: &[&str] = &["is", "was", "feels", "seems", "remains", "turns out"];

/// Generate `n` labelled sentences (label 1 positive, 0 negative), deterministic for `seed`.
pub fn generate(n: usize, seed: u64) -> (Vec<String>, Vec<i64>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut texts = Vec::with_capacity(n);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let label: i64 = rng.random_range(0..2);
        let (main, other) = if label == 1 {
            (POSITIVE, NEGATIVE)
        } else {
            (NEGATIVE, POSITIVE)
        };
        let subject = SUBJECTS.choose(&mut rng).expect("non-empty");
        let link = LINKS.choose(&mut rng).expect("non-empty");
        let a1 = main.choose(&mut rng).expect("non-empty");
        let mut s = format!("{subject} {link} {a1}");
        if rng.random_bool(0.5) {
            let a2 = main.choose(&mut rng).expect("non-empty");
            s.push_str(&format!(" and {a2}"));
        }
        if rng.random_bool(0.3) {
            let c = other.choose(&mut rng).expect("non-empty");
            s.push_str(&format!(" , though a little {c}"));
        }
        if rng.random_bool(0.6) {
            let f = FILLER.choose(&mut rng).expect("non-empty");
            s.push_str(&format!(" {f}"));
        }
        s.push_str(" .");
        // 3 % label noise.
        let label = if rng.random_bool(0.03) {
            1 - label
        } else {
            label
        };
        texts.push(s);
        labels.push(label);
    }
    (texts, labels)
}
