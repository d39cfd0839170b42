//! More keyspaces served by one process: each its own Postgres schema (on its own
//! Postgres, or the main one's), revision space, writer, compaction, leases, watch
//! feed and client listeners, isolated from the others (its own tasks, connections and
//! engine; a keyspace whose Postgres is down fails alone).
//!
//! Declared with `--serve-keyspace SPEC` (repeatable) or `--keyspaces-file FILE` (one
//! SPEC per line, `#` comments). A SPEC is whitespace-separated `key=value` pairs:
//! `name=events listen-client-urls=http://0.0.0.0:2479
//! postgres-url=postgres://pg2/etcd` (`advertise-client-urls=` optional; the
//! connection string in URL form, since spaces separate pairs). Everything else is the
//! main keyspace's flags: TLS, limits, compaction, watch settings, the member name.

use std::collections::HashSet;
use std::path::Path;

/// One more keyspace to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyspaceSpec {
    /// Its Postgres schema.
    pub name: String,
    /// Where its clients connect.
    pub listen_client_urls: Vec<String>,
    /// What MemberList advertises (default: the bound listen URLs).
    pub advertise_client_urls: Vec<String>,
    /// Its Postgres (default: the main keyspace's, or the managed one).
    pub postgres_url: Option<String>,
}

fn urls(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

impl std::str::FromStr for KeyspaceSpec {
    type Err = String;

    fn from_str(spec: &str) -> Result<Self, String> {
        let mut name = None;
        let mut listen = Vec::new();
        let mut advertise = Vec::new();
        let mut postgres_url = None;
        for pair in spec.split_whitespace() {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(format!("keyspace spec {spec:?}: {pair:?} is not key=value"));
            };
            match key {
                "name" => name = Some(value.to_owned()),
                "listen-client-urls" => listen = urls(value),
                "advertise-client-urls" => advertise = urls(value),
                "postgres-url" => postgres_url = Some(value.to_owned()),
                _ => {
                    return Err(format!(
                        "keyspace spec {spec:?}: unknown key {key:?} (name, listen-client-urls, advertise-client-urls, postgres-url)"
                    ));
                }
            }
        }
        let name = name.ok_or_else(|| format!("keyspace spec {spec:?}: no name="))?;
        pgetcd_storage_postgres::Layout::new(&name, 1)
            .map_err(|e| format!("keyspace spec {spec:?}: {e}"))?;
        if listen.is_empty() {
            return Err(format!(
                "keyspace spec {spec:?}: no listen-client-urls= (each keyspace has its own)"
            ));
        }
        for u in &listen {
            crate::transport::parse_listen_url(u).map_err(|e| format!("keyspace {name}: {e}"))?;
        }
        Ok(KeyspaceSpec {
            name,
            listen_client_urls: listen,
            advertise_client_urls: advertise,
            postgres_url,
        })
    }
}

/// The specs of a keyspaces file: one per line, blank lines and `#` comments skipped.
pub fn read_file(path: &Path) -> Result<Vec<KeyspaceSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("--keyspaces-file {}: {e}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| (i, l.split('#').next().unwrap_or("").trim()))
        .filter(|(_, l)| !l.is_empty())
        .map(|(i, l)| {
            l.parse()
                .map_err(|e| format!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Checks that every keyspace of the process (the main one named `main`, listening on
/// `main_listen`) has its own name and its own listen URLs.
pub fn check_distinct(
    main: &str,
    main_listen: &[String],
    specs: &[KeyspaceSpec],
) -> Result<(), String> {
    let mut names = HashSet::from([main.to_owned()]);
    let mut listen: HashSet<&String> = main_listen.iter().collect();
    for s in specs {
        if !names.insert(s.name.clone()) {
            return Err(format!("keyspace {:?} is declared twice", s.name));
        }
        for u in &s.listen_client_urls {
            // Port 0 (any free port) may repeat.
            if !u.ends_with(":0") && !listen.insert(u) {
                return Err(format!(
                    "keyspace {:?}: {u} is another keyspace's listen URL",
                    s.name
                ));
            }
        }
    }
    Ok(())
}

/// The store of the keyspace `storage` names, on `url`, with one read connection
/// (for the offline commands).
pub(crate) fn store_of(
    storage: &crate::config::StorageFlags,
    url: String,
) -> Result<pgetcd_storage_postgres::PgStore, crate::ServerError> {
    let mut config = storage.store_config(url);
    config.read_pool_size = 1;
    pgetcd_storage_postgres::PgStore::new(&config)
        .map_err(|e| crate::ServerError::Start(e.with_causes()))
}

/// `pgetcd keyspace ...`: returns the report to print.
pub async fn run(cmd: &crate::config::KeyspaceCommand) -> Result<String, crate::ServerError> {
    use crate::config::KeyspaceCommand;
    use pgetcd_storage::Store;
    match cmd {
        KeyspaceCommand::Create(args) => {
            let (mut pg, url) = crate::postgres_of(&args.storage).await?;
            let store = store_of(&args.storage, url)?;
            let meta = store.setup().await.map_err(crate::ServerError::from);
            if let Some(pg) = pg.as_mut() {
                pg.stop();
            }
            let meta = meta?;
            Ok(format!(
                "keyspace {:?}: revision {}, cluster id {:x}",
                args.storage.keyspace, meta.revision, meta.cluster_id
            ))
        }
        KeyspaceCommand::List(args) => {
            let (mut pg, url) = crate::postgres_of(&args.storage).await?;
            let listed = list(&args.storage, url).await;
            if let Some(pg) = pg.as_mut() {
                pg.stop();
            }
            listed
        }
        KeyspaceCommand::Drop(args) => {
            let name = &args.target.storage.keyspace;
            if args.confirm.as_deref() != Some(name.as_str()) {
                return Err(crate::ServerError::Config(format!(
                    "dropping keyspace {name:?} deletes every key and revision in it: pass --confirm {name} to do it"
                )));
            }
            let held =
                crate::admin::Exclusive::take(&args.target.storage, "pgetcd-keyspace-drop").await?;
            let consumers = consumers_of(held.store.as_ref()).await;
            let dropped = match consumers {
                Ok(consumers) => held
                    .store
                    .drop_keyspace(&consumers)
                    .await
                    .map_err(crate::ServerError::from),
                Err(e) => Err(e),
            };
            // The role went with the schema; only the managed Postgres is left to stop.
            let _ = held.release().await;
            dropped?;
            Ok(format!("dropped keyspace {name:?}"))
        }
        KeyspaceCommand::CopyPrefix(args) => crate::prefix_copy::run(args).await,
    }
}

/// The change feed consumers of every instance that ever registered.
async fn consumers_of(
    store: &pgetcd_storage_postgres::PgStore,
) -> Result<Vec<String>, crate::ServerError> {
    use pgetcd_storage::Store;
    let ever = std::time::Duration::from_secs(100 * 365 * 24 * 3600);
    Ok(store
        .members(ever)
        .await?
        .iter()
        .filter_map(|m| crate::node::feed_consumer(&m.name))
        .collect())
}

/// One line per keyspace of the Postgres at `url`.
async fn list(
    storage: &crate::config::StorageFlags,
    url: String,
) -> Result<String, crate::ServerError> {
    use pgetcd_storage::Store;
    let names = pgetcd_storage_postgres::list_keyspaces(&url).await?;
    let mut out = format!(
        "{:<24} {:>12} {:>12} {:>14}  {}",
        "KEYSPACE", "REVISION", "COMPACTED", "SIZE (BYTES)", "WRITER"
    );
    for name in names {
        let mut flags = storage.clone();
        flags.keyspace = name.clone();
        let store = store_of(&flags, url.clone())?;
        let meta = store.meta().await?;
        let size = store.size().await?;
        let writer = store.leader().await?.unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "\n{name:<24} {:>12} {:>12} {size:>14}  {writer}",
            meta.revision, meta.compact_revision
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let s: KeyspaceSpec = "name=events listen-client-urls=http://127.0.0.1:2479,http://10.0.0.1:2479 postgres-url=postgres://u@pg2:5432/etcd?sslmode=require"
            .parse()
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.name, "events");
        assert_eq!(s.listen_client_urls.len(), 2);
        assert_eq!(
            s.postgres_url.as_deref(),
            Some("postgres://u@pg2:5432/etcd?sslmode=require")
        );
        for (bad, why) in [
            ("listen-client-urls=http://127.0.0.1:1", "no name="),
            (
                "name=Bad listen-client-urls=http://127.0.0.1:1",
                "plain identifier",
            ),
            ("name=e", "no listen-client-urls="),
            ("name=e listen=http://x:1", "unknown key"),
            ("name=e listen-client-urls", "not key=value"),
        ] {
            let err = bad.parse::<KeyspaceSpec>().expect_err(bad);
            assert!(err.contains(why), "{bad}: {err}");
        }
        let spec = |n: &str, u: &str| KeyspaceSpec {
            name: n.into(),
            listen_client_urls: vec![u.into()],
            advertise_client_urls: vec![],
            postgres_url: None,
        };
        let main = vec!["http://127.0.0.1:2379".to_owned()];
        assert!(check_distinct("pgetcd", &main, &[spec("a", "http://127.0.0.1:2479")]).is_ok());
        assert!(
            check_distinct("pgetcd", &main, &[spec("pgetcd", "http://127.0.0.1:2479")]).is_err()
        );
        assert!(check_distinct("pgetcd", &main, &[spec("a", "http://127.0.0.1:2379")]).is_err());
    }
}
