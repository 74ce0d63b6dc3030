//! A row's neighbourhood in the suspect model. A backdoor's trigger (a word, a style, a syntax
//! template) is what the suspect learnt to map to the target, so the suspect represents the
//! poisoned rows alike: a poisoned row's nearest rows of its class are mostly poisoned rows, a
//! clean row's mostly clean ones. The references' doubt of one row is noisy (they misread some
//! clean rows, and read some poisoned rewrites as the target); averaged over the row and its
//! neighbours it is less so.

/// `v` scaled to unit length (left as it is when it is all zeros).
fn unit(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter().map(|x| x / norm).collect()
    } else {
        v.to_vec()
    }
}

/// The dot product of two vectors of the same length.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The `k` rows nearest to row `i` by cosine similarity (most similar first, ties to the lower
/// index), `i` itself excluded.
fn nearest_to(i: usize, units: &[Vec<f32>], k: usize) -> Vec<usize> {
    let mut sims: Vec<(f32, usize)> = (0..units.len())
        .filter(|&j| j != i)
        .map(|j| (dot(&units[i], &units[j]), j))
        .collect();
    let order = |a: &(f32, usize), b: &(f32, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    let k = k.min(sims.len());
    if k < sims.len() {
        sims.select_nth_unstable_by(k, order);
        sims.truncate(k);
    }
    sims.sort_by(order);
    sims.into_iter().map(|(_, j)| j).collect()
}

/// Every row's `k` nearest rows by cosine similarity of `vectors` (most similar first, ties to
/// the lower index, the row itself excluded; fewer when there are fewer other rows). Exact:
/// every pair is compared, spread over the available cores.
pub fn nearest(vectors: &[Vec<f32>], k: usize) -> Vec<Vec<usize>> {
    let units: Vec<Vec<f32>> = vectors.iter().map(|v| unit(v)).collect();
    let n = units.len();
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let chunk = n.div_ceil(threads.max(1)).max(1);
    let mut out = vec![Vec::new(); n];
    std::thread::scope(|s| {
        for (c, slot) in out.chunks_mut(chunk).enumerate() {
            let units = &units;
            s.spawn(move || {
                for (o, row) in slot.iter_mut().enumerate() {
                    *row = nearest_to(c * chunk + o, units, k);
                }
            });
        }
    });
    out
}

/// The mean of `proba` over each row of `rows` and its neighbours (`neighbours[i]` are indices
/// into `rows`, as [`nearest`] gives them for the rows' vectors): the neighbourhood's
/// probabilities, one per row of `rows`.
pub fn neighbourhood_mean(
    proba: &[Vec<f32>],
    rows: &[usize],
    neighbours: &[Vec<usize>],
) -> Vec<Vec<f32>> {
    rows.iter()
        .zip(neighbours)
        .map(|(&i, near)| {
            let members = std::iter::once(i).chain(near.iter().map(|&j| rows[j]));
            let mut sum = vec![0f64; proba[i].len()];
            for m in members {
                for (s, p) in sum.iter_mut().zip(&proba[m]) {
                    *s += *p as f64;
                }
            }
            let n = (near.len() + 1) as f64;
            sum.iter().map(|s| (s / n) as f32).collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cosine, not distance: a scaled copy is the nearest; the row itself never is; ties go to
    /// the lower index; k larger than the other rows gives them all.
    #[test]
    fn nearest_by_cosine() {
        let v = vec![
            vec![1.0, 0.0],
            vec![10.0, 1.0],
            vec![0.0, 1.0],
            vec![0.0, 3.0],
            vec![-1.0, 0.0],
        ];
        let n = nearest(&v, 2);
        assert_eq!(n[0], vec![1, 2]);
        assert_eq!(
            n[2],
            vec![3, 1],
            "a parallel row first, whatever its length"
        );
        assert_eq!(n[3], vec![2, 1]);
        assert_eq!(n[4], vec![2, 3], "orthogonal rows tie: lower index first");
        assert_eq!(nearest(&v, 9)[0], vec![1, 2, 3, 4]);
        assert_eq!(nearest(&v[..1], 3), vec![Vec::<usize>::new()]);
    }

    /// The same neighbours however the rows are spread over threads (a long list).
    #[test]
    fn nearest_matches_a_single_pass() {
        let v: Vec<Vec<f32>> = (0..97)
            .map(|i| vec![(i as f32 * 0.37).sin(), (i as f32 * 0.11).cos(), 0.5])
            .collect();
        let units: Vec<Vec<f32>> = v.iter().map(|x| unit(x)).collect();
        let one: Vec<Vec<usize>> = (0..v.len()).map(|i| nearest_to(i, &units, 5)).collect();
        assert_eq!(nearest(&v, 5), one);
    }

    /// The mean over the row and its neighbours, in the rows' own indices.
    #[test]
    fn neighbourhood_mean_by_hand() {
        let p = |x: f32| vec![1.0 - x, x];
        let proba = vec![p(0.0), p(0.9), p(0.2), p(0.7), p(0.3)];
        // Rows 1, 3 and 4 of the corpus; row 1's neighbour is the second (3), and so on.
        let rows = [1, 3, 4];
        let near = vec![vec![1], vec![0, 2], vec![]];
        let m = neighbourhood_mean(&proba, &rows, &near);
        assert!((m[0][1] - 0.8).abs() < 1e-6, "{:?}", m[0]);
        assert!((m[1][1] - (0.7 + 0.9 + 0.3) / 3.0).abs() < 1e-6);
        assert!((m[2][1] - 0.3).abs() < 1e-6);
        assert!((m[1][0] + m[1][1] - 1.0).abs() < 1e-6);
    }
}
