//! Object stores: `s3://bucket/key` inputs through the `object_store` crate, configured from the
//! standard `AWS_*` variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP` for local servers), and registered with DataFusion.
//! Credentials are never logged or written: only URLs appear in outputs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use futures::TryStreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::error::{BtuError, Result};

/// An `s3://bucket/key` location.
#[derive(Debug, Clone, PartialEq)]
pub struct S3Url {
    /// Bucket name (the URL's host part).
    pub bucket: String,
    /// Object key or prefix, without a leading `/` (empty for the bucket root).
    pub key: String,
}

impl S3Url {
    /// Parse `s3://bucket/key` (or `s3a://`); `None` for anything else.
    pub fn parse(s: &str) -> Option<S3Url> {
        let rest = s
            .strip_prefix("s3://")
            .or_else(|| s.strip_prefix("s3a://"))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        Some(S3Url {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The URL of an object in the same bucket.
    pub fn object(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    /// The bucket's root URL (what DataFusion keys the store by). Callers get the store first
    /// ([`s3_store`] refuses invalid bucket names), so the URL parses; an unparsable one maps to a
    /// placeholder rather than a panic.
    pub fn root(&self) -> url::Url {
        url::Url::parse(&format!("s3://{}", self.bucket))
            .unwrap_or_else(|_| url::Url::parse("s3://invalid-bucket").expect("literal URL"))
    }
}

/// Map an object-store error: missing object (66), retryable transport problems (75), other (74).
pub fn store_err(what: &str, e: object_store::Error) -> BtuError {
    match e {
        object_store::Error::NotFound { .. } => BtuError::missing(
            what,
            "the object does not exist; check the URL and AWS_* settings",
        ),
        other => {
            let msg = other.to_string();
            if is_temporary(&msg) {
                BtuError::Temporary {
                    context: what.to_string(),
                    message: one_line(&msg),
                }
            } else {
                BtuError::Io {
                    path: what.into(),
                    source: std::io::Error::other(one_line(&msg)),
                }
            }
        }
    }
}

/// Whether an error message describes a failure worth retrying (timeouts, refused or reset connections, throttling).
pub fn is_temporary(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    [
        "timed out",
        "timeout",
        "connection refused",
        "connection reset",
        "error sending request",
        "503",
        "slow down",
        "throttl",
        "dns error",
        "tcp connect",
    ]
    .iter()
    .any(|k| m.contains(k))
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Whether `b` is a valid S3 bucket name: 3-63 lowercase letters, digits, '.' or '-', starting
/// and ending with a letter or digit.
pub fn valid_bucket(b: &str) -> bool {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    (3..=63).contains(&b.len())
        && b.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-')
        && edge(b.chars().next())
        && edge(b.chars().last())
}

/// Check the `AWS_*` settings btu reads itself before the client uses them.
fn check_environment() -> Result<()> {
    for var in ["AWS_ENDPOINT_URL", "AWS_ENDPOINT"] {
        if let Ok(v) = std::env::var(var) {
            let ok = url::Url::parse(&v)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some());
            if !ok {
                return Err(BtuError::config(
                    var,
                    format!("'{v}' is not an http(s) URL; set it to the store's endpoint, e.g. http://127.0.0.1:9000"),
                ));
            }
        }
    }
    Ok(())
}

/// The store for a bucket (built once per process from the environment).
pub fn s3_store(bucket: &str) -> Result<Arc<dyn ObjectStore>> {
    if !valid_bucket(bucket) {
        return Err(BtuError::config(
            format!("s3://{bucket}"),
            "not a valid S3 bucket name (3-63 lowercase letters, digits, '.' or '-'); check the URL",
        ));
    }
    check_environment()?;
    static STORES: OnceLock<Mutex<HashMap<String, Arc<dyn ObjectStore>>>> = OnceLock::new();
    let mut map = STORES
        .get_or_init(Default::default)
        .lock()
        .expect("store cache");
    if let Some(s) = map.get(bucket) {
        return Ok(s.clone());
    }
    // Bounded retries so that an unreachable store fails (exit 75) in seconds, not minutes.
    let env_num = crate::validate::env_u64;
    let retry = object_store::RetryConfig {
        max_retries: env_num("BTU_S3_MAX_RETRIES", 3)? as usize,
        retry_timeout: std::time::Duration::from_secs(env_num("BTU_S3_RETRY_TIMEOUT_S", 30)?),
        ..Default::default()
    };
    let connect_timeout = env_num("BTU_S3_CONNECT_TIMEOUT_S", 5)?;
    let store = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry)
        .with_config(
            object_store::aws::AmazonS3ConfigKey::Client(
                object_store::ClientConfigKey::ConnectTimeout,
            ),
            format!("{connect_timeout}s"),
        )
        .build()
        .map_err(|e| {
            BtuError::config(
                format!("s3://{bucket}"),
                format!(
                    "cannot configure the S3 client from AWS_* variables: {}",
                    one_line(&e.to_string())
                ),
            )
        })?;
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    map.insert(bucket.to_string(), store.clone());
    Ok(store)
}

/// Objects (URL, size) an `s3://` input names: one object, every `*.parquet` under a prefix, or
/// the objects matching a glob in the key.
pub fn resolve(input: &str) -> Result<Vec<(String, u64)>> {
    let url = S3Url::parse(input)
        .ok_or_else(|| BtuError::config("--corpus", format!("'{input}' is not an s3:// URL")))?;
    let store = s3_store(&url.bucket)?;
    let rt = crate::io::corpus::runtime();
    let globbed = url.key.contains(['*', '?', '[']);
    if !globbed && !url.key.is_empty() && !url.key.ends_with('/') {
        match rt.block_on(store.head(&ObjectPath::from(url.key.as_str()))) {
            Ok(meta) => return Ok(vec![(input.to_string(), meta.size)]),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(store_err(input, e)),
        }
    }
    let prefix = if globbed {
        let cut = url.key.find(['*', '?', '[']).unwrap_or(0);
        url.key[..url.key[..cut].rfind('/').map_or(0, |i| i + 1)].to_string()
    } else {
        let k = url.key.trim_end_matches('/');
        if k.is_empty() {
            String::new()
        } else {
            format!("{k}/")
        }
    };
    let pattern = if globbed {
        Some(
            glob::Pattern::new(&url.key)
                .map_err(|e| BtuError::config("--corpus", format!("bad glob '{input}': {e}")))?,
        )
    } else {
        None
    };
    let prefix_path = ObjectPath::from(prefix.as_str());
    let listed: Vec<object_store::ObjectMeta> = rt
        .block_on(
            store
                .list(if prefix.is_empty() {
                    None
                } else {
                    Some(&prefix_path)
                })
                .try_collect(),
        )
        .map_err(|e| store_err(input, e))?;
    let mut hits: Vec<(String, u64)> = listed
        .into_iter()
        .filter(|m| {
            let k = m.location.as_ref();
            let name = k.rsplit('/').next().unwrap_or(k);
            let wanted = match &pattern {
                Some(p) => p.matches(k),
                None => k.ends_with(".parquet"),
            };
            wanted && !name.starts_with('_') && !name.starts_with('.')
        })
        .map(|m| (url.object(m.location.as_ref()), m.size))
        .collect();
    hits.sort();
    if hits.is_empty() {
        return Err(BtuError::missing(
            input,
            "no object at this URL (and no *.parquet under it as a prefix)",
        ));
    }
    Ok(hits)
}

/// Bytes `start..end` of an object.
pub fn read_range(input: &str, start: u64, end: u64) -> Result<Vec<u8>> {
    let url =
        S3Url::parse(input).ok_or_else(|| BtuError::internal(format!("not an s3 URL: {input}")))?;
    let store = s3_store(&url.bucket)?;
    let bytes = crate::io::corpus::runtime()
        .block_on(store.get_range(&ObjectPath::from(url.key.as_str()), start..end))
        .map_err(|e| store_err(input, e))?;
    Ok(bytes.to_vec())
}

/// Parts of a multipart upload (8 MiB; S3 wants at least 5 MiB except for the last part).
const PART_BYTES: usize = 8 << 20;

/// Whether the object `key` exists in `url`'s bucket.
pub fn exists(url: &S3Url, key: &str) -> Result<bool> {
    let store = s3_store(&url.bucket)?;
    match crate::io::corpus::runtime().block_on(store.head(&ObjectPath::from(key))) {
        Ok(_) => Ok(true),
        Err(object_store::Error::NotFound { .. }) => Ok(false),
        Err(e) => Err(store_err(&url.object(key), e)),
    }
}

/// The keys under `prefix` (a key ending in `/`), sorted.
pub fn keys_under(url: &S3Url, prefix: &str) -> Result<Vec<String>> {
    let store = s3_store(&url.bucket)?;
    let listed: Vec<object_store::ObjectMeta> = crate::io::corpus::runtime()
        .block_on(store.list(Some(&ObjectPath::from(prefix))).try_collect())
        .map_err(|e| store_err(&url.object(prefix), e))?;
    let mut keys: Vec<String> = listed.into_iter().map(|m| m.location.to_string()).collect();
    keys.sort();
    Ok(keys)
}

/// Delete the object `key`.
pub fn delete(url: &S3Url, key: &str) -> Result<()> {
    let store = s3_store(&url.bucket)?;
    crate::io::corpus::runtime()
        .block_on(store.delete(&ObjectPath::from(key)))
        .map_err(|e| store_err(&url.object(key), e))
}

/// Upload the local file `local` as the object `key`, visible only once complete: a file of one
/// part goes up in one conditional PUT (`If-None-Match: *` unless `overwrite`, so of two writers
/// racing for a new object one wins); a larger one as a multipart upload, completed only after
/// every part arrived (and, unless `overwrite`, after checking that no object appeared
/// meanwhile), aborted on any failure.
pub fn upload(local: &std::path::Path, url: &S3Url, key: &str, overwrite: bool) -> Result<()> {
    let store = s3_store(&url.bucket)?;
    let target = url.object(key);
    let size = std::fs::metadata(local)
        .map_err(|e| BtuError::io(local, e))?
        .len();
    let rt = crate::io::corpus::runtime();
    let path = ObjectPath::from(key);
    if size <= PART_BYTES as u64 {
        let bytes = std::fs::read(local).map_err(|e| BtuError::io(local, e))?;
        let mode = if overwrite {
            object_store::PutMode::Overwrite
        } else {
            object_store::PutMode::Create
        };
        let opts = object_store::PutOptions {
            mode,
            ..Default::default()
        };
        return match rt.block_on(store.put_opts(&path, bytes.into(), opts)) {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(BtuError::OutputExists {
                path: target.into(),
            }),
            Err(e) => Err(store_err(&target, e)),
        };
    }
    rt.block_on(upload_parts(store, local, &path, &target, overwrite))
}

/// The multipart half of [`upload`].
async fn upload_parts(
    store: Arc<dyn ObjectStore>,
    local: &std::path::Path,
    path: &ObjectPath,
    target: &str,
    overwrite: bool,
) -> Result<()> {
    use std::io::Read;
    let upload = store
        .put_multipart(path)
        .await
        .map_err(|e| store_err(target, e))?;
    let mut writer = object_store::WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
    let filled = async {
        let mut file = std::fs::File::open(local).map_err(|e| BtuError::io(local, e))?;
        let mut buf = vec![0u8; PART_BYTES];
        loop {
            let n = file.read(&mut buf).map_err(|e| BtuError::io(local, e))?;
            if n == 0 {
                break;
            }
            // At most 4 parts in flight: memory stays bounded whatever the file's size.
            writer
                .wait_for_capacity(4)
                .await
                .map_err(|e| store_err(target, e))?;
            writer.write(&buf[..n]);
        }
        if !overwrite && store.head(path).await.is_ok() {
            return Err(BtuError::OutputExists {
                path: target.into(),
            });
        }
        Ok(())
    }
    .await;
    match filled {
        Ok(()) => writer
            .finish()
            .await
            .map(|_| ())
            .map_err(|e| store_err(target, e)),
        Err(e) => {
            let _ = writer.abort().await;
            Err(e)
        }
    }
}

/// Upload bytes to an `s3://` URL (used by tests and benchmarks to stage data).
pub fn put(url_str: &str, bytes: Vec<u8>) -> Result<()> {
    let url = S3Url::parse(url_str)
        .ok_or_else(|| BtuError::internal(format!("not an s3 URL: {url_str}")))?;
    let store = s3_store(&url.bucket)?;
    crate::io::corpus::runtime()
        .block_on(store.put(&ObjectPath::from(url.key.as_str()), bytes.into()))
        .map_err(|e| store_err(url_str, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_urls() {
        assert_eq!(
            S3Url::parse("s3://lake/a/b.parquet"),
            Some(S3Url {
                bucket: "lake".into(),
                key: "a/b.parquet".into()
            })
        );
        assert_eq!(
            S3Url::parse("s3://lake"),
            Some(S3Url {
                bucket: "lake".into(),
                key: "".into()
            })
        );
        assert_eq!(S3Url::parse("/tmp/x.parquet"), None);
        assert!(is_temporary("error sending request: operation timed out"));
        assert!(!is_temporary("Access Denied"));
        assert!(valid_bucket("lake") && valid_bucket("my.bucket-1"));
        for bad in ["bad bucket", "ab", "Lake", "-lake", "lake-", ""] {
            assert!(!valid_bucket(bad), "{bad}");
        }
    }
}
