//! Outputs as transactions (design.md "Outputs are transactions"): every file or directory is
//! written under a temporary name and renamed into place only when complete, so a failed or
//! killed command leaves nothing that looks like a finished output.
//!
//! An output named `s3://bucket/key` (scan, detect, verify, sql) is staged in the local temporary
//! directory and uploaded when complete: a file as one object (a conditional PUT, or a multipart
//! upload for more than one part; invisible until complete), a directory as one object per file
//! with a `_SUCCESS` marker written last (and removed first when an output is replaced).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{BtuError, Result};
use crate::io::store::S3Url;

/// Refuse an existing output unless `overwrite`; make sure a place to stage it exists and is
/// writable (checked before any work, so a bad `--out` fails in seconds, not after hours of
/// training); remove temporary files that killed runs left for this output.
pub fn check_output(path: &Path, overwrite: bool) -> Result<()> {
    if let Some(url) = remote(path) {
        return check_remote(path, &url, overwrite);
    }
    if path.exists() && !overwrite {
        return Err(BtuError::OutputExists {
            path: path.to_path_buf(),
        });
    }
    let parent = staging_parent(path)?;
    clean_stale(&parent, path);
    tempfile::Builder::new()
        .prefix(&format!("{}probe-", temp_prefix(path)))
        .tempfile_in(&parent)
        .map_err(|e| unwritable(path, e))?;
    Ok(())
}

/// The object-store location of an output named `s3://bucket/key`.
pub fn remote(path: &Path) -> Option<S3Url> {
    path.to_str().and_then(S3Url::parse)
}

/// The marker object written last into a directory output on an object store.
pub const SUCCESS_MARKER: &str = "_SUCCESS";

/// An object-store output: a valid bucket, an object key, reachable, and (unless `overwrite`)
/// neither an object nor a finished directory (its `_SUCCESS` marker) at the URL.
fn check_remote(path: &Path, url: &S3Url, overwrite: bool) -> Result<()> {
    crate::io::store::s3_store(&url.bucket)?;
    clean_stale(&std::env::temp_dir(), path);
    let key = url.key.trim_end_matches('/');
    if key.is_empty() {
        return Err(BtuError::config(
            "--out",
            format!(
                "{}: name an object key under the bucket, e.g. s3://{}/audit/out",
                path.display(),
                url.bucket
            ),
        ));
    }
    let taken = crate::io::store::exists(url, key)?
        || crate::io::store::exists(url, &format!("{key}/{SUCCESS_MARKER}"))?;
    if taken && !overwrite {
        return Err(BtuError::OutputExists {
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

/// Where an output is staged: beside a local target (so that the final rename stays on one file
/// system), the local temporary directory for an object-store one (uploaded from there).
fn staging_dir(target: &Path) -> Result<PathBuf> {
    match remote(target) {
        Some(_) => Ok(std::env::temp_dir()),
        None => staging_parent(target),
    }
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

/// `.<name>.tmp-<pid>-`: temporary names carry the writer's process id, so a later run can tell
/// a dead writer's leftovers from a live one's.
fn temp_prefix(target: &Path) -> String {
    let name = target.file_name().and_then(|s| s.to_str()).unwrap_or("out");
    format!(".{name}.tmp-{}-", std::process::id())
}

/// Whether process `pid` is running (Linux: `/proc/<pid>` exists; elsewhere assumed alive).
fn alive(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        true
    }
}

/// Remove `.<name>.tmp-<pid>-*` entries in `dir` whose writer is no longer running.
fn clean_stale(dir: &Path, target: &Path) {
    let name = target.file_name().and_then(|s| s.to_str()).unwrap_or("out");
    let prefix = format!(".{name}.tmp-");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(pid) = file
            .strip_prefix(&prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !alive(pid) {
            tracing::info!("removing {} left by a killed run", e.path().display());
            let _ = fs::remove_dir_all(e.path()).or_else(|_| fs::remove_file(e.path()));
        }
    }
}

fn unwritable(path: &Path, e: impl std::fmt::Display) -> BtuError {
    BtuError::OutputUnwritable {
        path: path.to_path_buf(),
        reason: e.to_string(),
    }
}

/// The process umask (from `/proc/self/status`; 022 where it cannot be read).
fn umask() -> u32 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Umask:"))
                .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
        })
        .unwrap_or(0o022)
}

/// Give a finished output the permissions a plain `create` would have (temporary files and
/// directories are created private): 0666 / 0777 less the umask.
fn ordinary_permissions(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = fs::metadata(path).map_err(|e| BtuError::io(path, e))?;
        let base = if meta.is_dir() { 0o777 } else { 0o666 };
        fs::set_permissions(path, fs::Permissions::from_mode(base & !umask()))
            .map_err(|e| BtuError::io(path, e))?;
    }
    Ok(())
}

/// Rename `from` to `to` only if `to` does not exist, atomically where the system allows it
/// (Linux `renameat2(RENAME_NOREPLACE)`): two writers racing for one output cannot both win.
fn rename_no_replace(from: &Path, to: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = |p: &Path| {
            std::ffi::CString::new(p.as_os_str().as_bytes()).map_err(|e| unwritable(to, e))
        };
        let (a, b) = (c(from)?, c(to)?);
        // SAFETY: both arguments are valid NUL-terminated paths for the duration of the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EEXIST) | Some(libc::ENOTEMPTY) => {
                return Err(BtuError::OutputExists {
                    path: to.to_path_buf(),
                })
            }
            // File systems without RENAME_NOREPLACE: fall back to check-then-rename below.
            Some(libc::EINVAL) | Some(libc::ENOSYS) => {}
            _ => return Err(unwritable(to, err)),
        }
    }
    if to.exists() {
        return Err(BtuError::OutputExists {
            path: to.to_path_buf(),
        });
    }
    fs::rename(from, to).map_err(|e| unwritable(to, e))
}

/// An output directory being written. Files go into a hidden staging directory beside the
/// target; [`OutputDir::commit`] renames it into place. Dropped without commit, it is removed.
pub struct OutputDir {
    target: PathBuf,
    staging: Option<tempfile::TempDir>,
    overwrite: bool,
    /// Where the directory goes when it is an object-store prefix.
    remote: Option<S3Url>,
}

impl OutputDir {
    /// Start writing the directory `target`.
    pub fn create(target: &Path, overwrite: bool) -> Result<Self> {
        check_output(target, overwrite)?;
        let staging = tempfile::Builder::new()
            .prefix(&temp_prefix(target))
            .tempdir_in(staging_dir(target)?)
            .map_err(|e| unwritable(target, e))?;
        Ok(OutputDir {
            target: target.to_path_buf(),
            staging: Some(staging),
            overwrite,
            remote: remote(target),
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

    /// Write `value` as pretty JSON (with a final newline) inside the staging directory.
    /// Keys are sorted ([`json_text`]).
    pub fn write_json<T: serde::Serialize + ?Sized>(&self, name: &str, value: &T) -> Result<()> {
        self.write(name, json_text(value)?.as_bytes())
    }

    /// Rename the staging directory into place: exclusively without `overwrite` (a concurrent
    /// writer that got there first wins, this one gets exit 73), replacing it with. On failure
    /// the staging directory is removed and an existing output is left as it was.
    pub fn commit(mut self) -> Result<PathBuf> {
        let staging = self.staging.take().expect("commit once");
        if let Some(url) = &self.remote {
            upload_dir(staging.path(), url, self.overwrite)?;
            return Ok(self.target.clone());
        }
        ordinary_permissions(staging.path())?;
        if let Some(parent) = self.target.parent() {
            if !parent.as_os_str().is_empty() {
                fs::create_dir_all(parent).map_err(|e| unwritable(&self.target, e))?;
            }
        }
        if !self.overwrite || !self.target.exists() {
            // `staging` (a TempDir) removes itself if the rename fails.
            rename_no_replace(staging.path(), &self.target)?;
            let _ = staging.keep();
            return Ok(self.target.clone());
        }
        let old = staging.path().with_extension("old");
        fs::rename(&self.target, &old).map_err(|e| unwritable(&self.target, e))?;
        if let Err(e) = fs::rename(staging.path(), &self.target) {
            let _ = fs::rename(&old, &self.target);
            return Err(unwritable(&self.target, e));
        }
        let _ = staging.keep();
        if old.is_dir() {
            let _ = fs::remove_dir_all(&old);
        } else {
            let _ = fs::remove_file(&old);
        }
        Ok(self.target.clone())
    }
}

/// Upload a staged directory under `url`'s key: the old `_SUCCESS` marker removed (an output
/// being replaced is not complete until its new marker is there), every file (sorted by name),
/// then objects there that are not part of it removed (an older output replaced with
/// --overwrite, or what a killed upload left), then the `_SUCCESS` marker (conditionally unless
/// `overwrite`: of two writers finishing the same new output, the second gets exit 73).
fn upload_dir(staging: &Path, url: &S3Url, overwrite: bool) -> Result<()> {
    let prefix = format!("{}/", url.key.trim_end_matches('/'));
    let mut files = Vec::new();
    collect_files(staging, staging, &mut files)?;
    files.sort();
    let marker = format!("{prefix}{SUCCESS_MARKER}");
    if crate::io::store::exists(url, &marker)? {
        if !overwrite {
            return Err(BtuError::OutputExists {
                path: url.object(&marker).into(),
            });
        }
        crate::io::store::delete(url, &marker)?;
    }
    for rel in &files {
        let key = format!("{prefix}{rel}");
        crate::io::store::upload(&staging.join(rel), url, &key, true)?;
    }
    for key in crate::io::store::keys_under(url, &prefix)? {
        let rel = &key[prefix.len()..];
        if rel != SUCCESS_MARKER && !files.iter().any(|f| f == rel) {
            tracing::info!("removing {} (not part of this output)", url.object(&key));
            crate::io::store::delete(url, &key)?;
        }
    }
    let empty = tempfile::NamedTempFile::new().map_err(|e| unwritable(Path::new(&marker), e))?;
    crate::io::store::upload(empty.path(), url, &marker, overwrite)
}

/// Paths (relative to `root`, `/`-separated) of the files under `dir`.
fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<()> {
    for e in fs::read_dir(dir).map_err(|e| BtuError::io(dir, e))? {
        let p = e.map_err(|e| BtuError::io(dir, e))?.path();
        if p.is_dir() {
            collect_files(root, &p, out)?;
        } else {
            let rel = p.strip_prefix(root).map_err(BtuError::internal)?;
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
    Ok(())
}

/// `value` as pretty JSON with a final newline, keys sorted (it goes through
/// [`serde_json::Value`], so a typed result and JSON built by hand read the same).
pub fn json_text<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    let value = serde_json::to_value(value).map_err(BtuError::internal)?;
    Ok(serde_json::to_string_pretty(&value).map_err(BtuError::internal)? + "\n")
}

/// Write `value` as pretty JSON ([`json_text`]) to `target` atomically, replacing what is there.
pub fn write_json_atomic<T: serde::Serialize + ?Sized>(target: &Path, value: &T) -> Result<()> {
    let text = json_text(value)?;
    write_file_atomic(target, true, |f| {
        f.write_all(text.as_bytes())
            .map_err(|e| BtuError::io(target, e))
    })
}

/// Write one file atomically: into a temporary file beside it, then rename (exclusively unless
/// `overwrite`: of several writers racing for one new output exactly one succeeds).
pub fn write_file_atomic(
    target: &Path,
    overwrite: bool,
    fill: impl FnOnce(&mut fs::File) -> Result<()>,
) -> Result<()> {
    check_output(target, overwrite)?;
    let mut tmp = tempfile::Builder::new()
        .prefix(&temp_prefix(target))
        .tempfile_in(staging_dir(target)?)
        .map_err(|e| unwritable(target, e))?;
    fill(tmp.as_file_mut())?;
    tmp.as_file_mut()
        .flush()
        .map_err(|e| BtuError::io(target, e))?;
    if let Some(url) = remote(target) {
        return crate::io::store::upload(
            tmp.path(),
            &url,
            url.key.trim_end_matches('/'),
            overwrite,
        );
    }
    tmp.as_file()
        .sync_all()
        .map_err(|e| BtuError::io(target, e))?;
    ordinary_permissions(tmp.path())?;
    if let Some(p) = target.parent() {
        if !p.as_os_str().is_empty() {
            fs::create_dir_all(p).map_err(|e| unwritable(target, e))?;
        }
    }
    if overwrite {
        tmp.persist(target)
            .map_err(|e| unwritable(target, e.error))?;
    } else {
        // `tmp` (a NamedTempFile) removes itself if the rename fails.
        rename_no_replace(tmp.path(), target)?;
        let _ = tmp.into_temp_path().keep();
    }
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

    #[test]
    fn racing_writers_of_a_new_output_have_one_winner() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("out.txt");
        let wins: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..6)
                .map(|i| {
                    let t = target.clone();
                    s.spawn(move || {
                        write_file_atomic(&t, false, |f| {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                            f.write_all(format!("{i}").as_bytes())
                                .map_err(|e| BtuError::io("x", e))
                        })
                        .is_ok() as usize
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1, "exactly one writer creates a new output");
        let dirs: usize = std::thread::scope(|s| {
            let hs: Vec<_> = (0..6)
                .map(|_| {
                    let t = d.path().join("dir");
                    s.spawn(move || {
                        let Ok(o) = OutputDir::create(&t, false) else {
                            return 0;
                        };
                        o.write("a", b"1").unwrap();
                        std::thread::sleep(std::time::Duration::from_millis(50));
                        o.commit().is_ok() as usize
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(dirs, 1, "exactly one writer creates a new directory");
        let leftovers: Vec<_> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[cfg(unix)]
    #[test]
    fn outputs_get_ordinary_permissions_and_dead_writers_leftovers_go() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f.txt");
        write_file_atomic(&f, false, |_| Ok(())).unwrap();
        let mode = std::fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o666 & !umask(), "file mode {mode:o}");
        let o = OutputDir::create(&d.path().join("dir"), false).unwrap();
        let dir = o.commit().unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o777 & !umask(), "dir mode {mode:o}");
        // A leftover of a process that no longer exists (pid beyond pid_max) is removed; a live one stays.
        let dead = d.path().join(".g.txt.tmp-4999999-abc");
        let live = d
            .path()
            .join(format!(".g.txt.tmp-{}-abc", std::process::id()));
        std::fs::write(&dead, b"x").unwrap();
        std::fs::write(&live, b"x").unwrap();
        check_output(&d.path().join("g.txt"), false).unwrap();
        assert!(!dead.exists(), "dead writer's temp file removed");
        assert!(live.exists(), "live writer's temp file kept");
    }
}
