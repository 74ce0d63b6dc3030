//! Shards of a corpus for a fan-out on a workflow engine (`btu scan --shard I/N`, `--plan`): the
//! corpus's row groups, in reading order (files sorted, row groups in file order), cut into N
//! contiguous runs of about equal rows. The cut depends only on the file list and each file's
//! row-group sizes, so every shard of a fan-out computes the same partition on its own, and the
//! shards together read every row exactly once.

use serde::Serialize;

use crate::error::{BtuError, Result};
use crate::io::corpus::InputFile;

/// Shard `index` of `count` (`--shard I/N`, 0-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Shard {
    /// This shard, 0-based.
    pub index: usize,
    /// How many shards the corpus is cut into.
    pub count: usize,
}

impl std::str::FromStr for Shard {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}' is not I/N with 0 <= I < N (e.g. 0/4)");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let (index, count): (usize, usize) = (
            i.trim().parse().map_err(|_| bad())?,
            n.trim().parse().map_err(|_| bad())?,
        );
        if count == 0 || index >= count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The row groups of one file a shard reads: `row_groups` is the half-open range
/// `[start, end)`, `first_row` the file row its first row group starts at.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardFile {
    /// The file, as resolved.
    pub path: String,
    /// Row groups `[start, end)`.
    pub row_groups: [usize; 2],
    /// The file's row number of the first row read.
    pub first_row: u64,
    /// Rows in these row groups.
    pub rows: u64,
}

/// One shard of the plan (`btu scan --plan` prints the list).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ShardItem {
    /// `I/N`, as `--shard` takes it.
    pub shard: String,
    /// I.
    pub index: usize,
    /// Rows in the shard (before any --filter).
    pub rows: u64,
    /// What it reads.
    pub files: Vec<ShardFile>,
}

/// Row groups per shard: each row group goes to the shard its middle row falls in when the
/// corpus's rows are cut into `count` equal runs.
pub fn plan(files: &[InputFile], count: usize) -> Vec<ShardItem> {
    let total: u64 = files.iter().flat_map(|f| &f.row_groups).sum();
    let mut items: Vec<ShardItem> = (0..count)
        .map(|index| ShardItem {
            shard: Shard { index, count }.to_string(),
            index,
            rows: 0,
            files: Vec::new(),
        })
        .collect();
    let mut start = 0u64;
    for f in files {
        let mut first_row = 0u64;
        for (rg, &rows) in f.row_groups.iter().enumerate() {
            let middle = start as u128 * 2 + rows as u128;
            let i = ((middle * count as u128) / (total.max(1) as u128 * 2)) as usize;
            let item = &mut items[i.min(count - 1)];
            item.rows += rows;
            match item.files.last_mut() {
                Some(last) if last.path == f.path && last.row_groups[1] == rg => {
                    last.row_groups[1] = rg + 1;
                    last.rows += rows;
                }
                _ => item.files.push(ShardFile {
                    path: f.path.clone(),
                    row_groups: [rg, rg + 1],
                    first_row,
                    rows,
                }),
            }
            first_row += rows;
            start += rows;
        }
    }
    items
}

/// The default shard count of `--plan`: one per million rows, never more than the row groups.
pub fn default_count(files: &[InputFile]) -> usize {
    let rows: u64 = files.iter().flat_map(|f| &f.row_groups).sum();
    let groups: usize = files.iter().map(|f| f.row_groups.len()).sum();
    (rows.div_ceil(1_000_000) as usize).clamp(1, groups.max(1))
}

/// `--shard` cannot be combined with a choice that depends on the rows before the shard.
pub fn check_compatible(
    shard: Option<Shard>,
    limit: Option<u64>,
    sample: Option<f64>,
) -> Result<()> {
    if shard.is_none() {
        return Ok(());
    }
    let clash = if limit.is_some() {
        "--limit"
    } else if sample.is_some() {
        "--sample"
    } else {
        return Ok(());
    };
    Err(BtuError::config(
        "--shard",
        format!("cannot be combined with {clash} (it counts rows across the whole corpus); filter rows with --filter instead"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, groups: &[u64]) -> InputFile {
        InputFile {
            path: path.into(),
            bytes: 0,
            row_groups: groups.to_vec(),
            schema: None,
        }
    }

    #[test]
    fn shards_cover_every_row_group_once_in_contiguous_balanced_runs() {
        let files = [
            file("a", &[100, 100, 100]),
            file("b", &[50, 250]),
            file("c", &[400]),
        ];
        for count in 1..=8 {
            let p = plan(&files, count);
            assert_eq!(p.len(), count);
            let mut seen: Vec<(String, usize)> = Vec::new();
            for item in &p {
                for f in &item.files {
                    let groups = files.iter().find(|x| x.path == f.path).unwrap();
                    let first: u64 = groups.row_groups[..f.row_groups[0]].iter().sum();
                    assert_eq!(f.first_row, first, "first row of {f:?}");
                    for rg in f.row_groups[0]..f.row_groups[1] {
                        seen.push((f.path.clone(), rg));
                    }
                }
                assert_eq!(item.rows, item.files.iter().map(|f| f.rows).sum::<u64>());
            }
            let expected: Vec<(String, usize)> = files
                .iter()
                .flat_map(|f| (0..f.row_groups.len()).map(|rg| (f.path.clone(), rg)))
                .collect();
            assert_eq!(
                seen, expected,
                "{count} shards: each row group once, in order"
            );
        }
        // Four shards of 1,000 rows: a row group goes where its middle row falls.
        let four = plan(&files, 4);
        let rows: Vec<u64> = four.iter().map(|i| i.rows).collect();
        assert_eq!(
            rows,
            [200, 400, 0, 400],
            "a shard may be empty when row groups are coarse"
        );
        assert_eq!(four[1].files[0].path, "a");
        assert_eq!(four[1].files[0].row_groups, [2, 3]);
        assert_eq!(four[1].files[0].first_row, 200);
        assert_eq!(four[1].files[1].row_groups, [0, 2]);
        assert_eq!(default_count(&files), 1);
    }

    #[test]
    fn parses_shard_specs() {
        assert_eq!("1/4".parse::<Shard>(), Ok(Shard { index: 1, count: 4 }));
        for bad in ["4/4", "0/0", "x/2", "1", "-1/2"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        assert!(check_compatible(Some(Shard { index: 0, count: 2 }), Some(5), None).is_err());
        assert!(check_compatible(Some(Shard { index: 0, count: 2 }), None, Some(0.5)).is_err());
        assert!(check_compatible(None, Some(5), Some(0.5)).is_ok());
    }
}
