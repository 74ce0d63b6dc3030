//! Outputs as transactions (design.md "Outputs are transactions"): every file or directory is
//! written under a temporary name and renamed into place only when complete, so a failed or
//! killed command leaves nothing that looks like a finished output.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{BtuError, Result};

/// Refuse an existing output unless `overwrite`; make sure a place to stage it exists.
pub fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    if path.exists() && !overwrite {
        return Err(BtuError::OutputExists {
            path: path.to_path_buf(),
        });
    }
    staging_parent(path)?;
    Ok(())
}

/// The nearest existing ancestor directory of `path`, where temporary outputs are staged.
fn staging_parent(path: &Path) -> Result<PathBuf> {
    let mut cur = path.parent().map(Path::to_path_buf).unwrap_or_default();
    loop {
        let probe = if cur.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            cur.clone()
        };
        match fs::metadata(&probe) {
            Ok(m) if m.is_dir() => return Ok(probe),
            Ok(_) => {
                return Err(BtuError::OutputUnwritable {
                    path: path.to_path_buf(),
                    reason: format!("{} is not a directory", probe.display()),
                })
            }
            Err(_) => match cur.parent() {
                Some(p) => cur = p.to_path_buf(),
                None => return Ok(PathBuf::from(".")),
            },
        }
    }
}

fn unwritable(path: &Path, e: impl std::fmt::Display) -> BtuError {
    BtuError::OutputUnwritable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// An output directory being written. Files go into a hidden staging directory beside the
/// target; [`OutputDir::commit`] renames it into place. Dropped without commit, it is removed.
pub struct OutputDir {
    target: PathBuf,
    staging: Option<tempfile::TempDir>,
    overwrite: bool,
}

impl OutputDir {
    /// Start writing the directory `target`.
    pub fn create(target: &Path, overwrite: bool) -> Result<Self> {
        check_output(target, overwrite)?;
        let parent = staging_parent(target)?;
        let name = target.file_name().and_then(|s| s.to_str()).unwrap_or("out");
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}.tmp-"))
            .tempdir_in(&parent)
            .map_err(|e| unwritable(target, e))?;
        Ok(OutputDir {
            target: target.to_path_buf(),
            staging: Some(staging),
            overwrite,
        })
    }

    /// Path of a file inside the staging directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.staging
            .as_ref()
            .expect("staging dir present until commit")
            .path()
            .join(name)
    }

    /// The final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Write a whole file inside the staging directory.
    pub fn write(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let p = self.path(name);
        fs::write(&p, bytes).map_err(|e| BtuError::io(&p, e))
    }

    /// Rename the staging directory into place (replacing an existing one when allowed).
    pub fn commit(mut self) -> Result<PathBuf> {
        let staging = self.staging.take().expect("commit once").keep();
        if let Some(parent) = self.target.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(|e| unwritable(&self.target, e))?;
            }
        }
        if self.target.exists() {
            if !self.overwrite {
                let _ = fs::remove_dir_all(&staging);
                return Err(BtuError::OutputExists {
                    path: self.target.clone(),
                });
            }
            let old = staging.with_extension("old");
            fs::rename(&self.target, &old).map_err(|e| unwritable(&self.target, e))?;
            fs::rename(&staging, &self.target).map_err(|e| unwritable(&self.target, e))?;
            if old.is_dir() {
                let _ = fs::remove_dir_all(&old);
            } else {
                let _ = fs::remove_file(&old);
            }
        } else {
            fs::rename(&staging, &self.target).map_err(|e| unwritable(&self.target, e))?;
        }
        Ok(self.target.clone())
    }
}

/// Write one file atomically: into a temporary file beside it, then rename.
pub fn write_file_atomic(
    target: &Path,
    overwrite: bool,
    fill: impl FnOnce(&mut fs::File) -> Result<()>,
) -> Result<()> {
    check_output(target, overwrite)?;
    let parent = staging_parent(target)?;
    let name = target.file_name().and_then(|s| s.to_str()).unwrap_or("out");
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.tmp-"))
        .tempfile_in(&parent)
        .map_err(|e| unwritable(target, e))?;
    fill(tmp.as_file_mut())?;
    tmp.as_file_mut()
        .flush()
        .map_err(|e| BtuError::io(target, e))?;
    tmp.as_file()
        .sync_all()
        .map_err(|e| BtuError::io(target, e))?;
    if let Some(p) = target.parent() {
        if !p.as_os_str().is_empty() {
            fs::create_dir_all(p).map_err(|e| unwritable(target, e))?;
        }
    }
    if !overwrite && target.exists() {
        return Err(BtuError::OutputExists {
            path: target.to_path_buf(),
        });
    }
    tmp.persist(target)
        .map_err(|e| unwritable(target, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uncommitted_output_leaves_nothing_and_commit_replaces_only_with_overwrite() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("nested/out");
        {
            let o = OutputDir::create(&target, false).unwrap();
            o.write("a.txt", b"1").unwrap();
        }
        assert!(!target.exists());
        assert_eq!(
            std::fs::read_dir(d.path()).unwrap().count(),
            0,
            "staging removed"
        );
        let o = OutputDir::create(&target, false).unwrap();
        o.write("a.txt", b"1").unwrap();
        o.commit().unwrap();
        assert_eq!(std::fs::read(target.join("a.txt")).unwrap(), b"1");
        assert!(matches!(
            OutputDir::create(&target, false),
            Err(BtuError::OutputExists { .. })
        ));
        let o = OutputDir::create(&target, true).unwrap();
        o.write("b.txt", b"2").unwrap();
        o.commit().unwrap();
        assert!(!target.join("a.txt").exists());
        assert_eq!(
            std::fs::read_dir(d.path().join("nested")).unwrap().count(),
            1,
            "old copy removed"
        );
    }
}
