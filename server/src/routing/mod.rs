//! Prefix routing: one listener serving several keyspaces of the process, each key
//! prefix of `--route-prefix PREFIX=KEYSPACE` going to that keyspace and every other
//! key to the listener's own (the main keyspace).
//!
//! Every keyspace keeps its own revision space. A request, a Txn (all its compares and
//! operations, nested ones included) or a watch is served by one keyspace, exactly as
//! that keyspace's own listener serves it, with that keyspace's revisions in its
//! headers. One whose keys fall in more than one keyspace is refused whole with
//! `InvalidArgument` naming the keyspaces (a watch: its create is answered created and
//! cancelled with that reason, since its stream carries other watchers). Nothing maps
//! revisions between keyspaces, so nothing a client reads can mix two revision spaces:
//!
//! - a watch stream carries watchers of several keyspaces, each with its keyspace's
//!   revisions; a WatchProgressRequest on a stream whose watchers are all in one
//!   keyspace is answered as etcd does (watch id -1, that keyspace's revision); on a
//!   stream whose watchers span keyspaces, each keyspace's answer goes to its own
//!   watchers, one response per watcher ([`watch`]);
//! - leases are granted in every keyspace of the listener under one id, so that a key
//!   of any of them can be attached to it; KeepAlive, Revoke, TimeToLive and Leases
//!   act on all of them ([`lease`]);
//! - Compact compacts the main keyspace to the revision asked; the routed keyspaces are
//!   compacted to the revisions they had when the main keyspace was at that revision,
//!   so each keeps the same span of time ([`compaction`]);
//! - Maintenance and Cluster answer for the main keyspace (each keyspace's own listener
//!   answers for it).

mod compaction;
mod kv;
mod lease;
mod watch;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use pgetcd_proto::etcdserverpb::{RequestOp, TxnRequest, request_op::Request as Op};

pub use compaction::CompactionMap;
pub use kv::RoutedKv;
pub use lease::RoutedLease;
pub use watch::RoutedWatch;

use crate::node::Node;
use crate::services::{KvService, LeaseService, WatchService};

/// A keyspace's answers on a stream a router opened there, then None when that stream
/// ended.
type Answers<T> =
    Pin<Box<dyn futures::Stream<Item = Option<Result<T, tonic::Status>>> + Send + Sync>>;

/// `answers`, with the None at its end.
fn until_end<T: Send + Sync + 'static>(
    answers: tokio_stream::wrappers::ReceiverStream<Result<T, tonic::Status>>,
) -> Answers<T> {
    use futures::StreamExt;
    Box::pin(
        answers
            .map(Some)
            .chain(futures::stream::once(async { None })),
    )
}

/// What keyspace `k`'s stream gave: an answer, or why it ended.
fn outcome<T>(
    routes: &Routes,
    k: usize,
    answer: Option<Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    answer.unwrap_or_else(|| {
        Err(tonic::Status::unavailable(format!(
            "pgetcd: keyspace {} stopped serving",
            routes.targets()[k].name
        )))
    })
}

/// `--route-prefix PREFIX=KEYSPACE`: keys starting with PREFIX go to KEYSPACE.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePrefix {
    pub prefix: Bytes,
    pub keyspace: String,
}

impl std::str::FromStr for RoutePrefix {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let Some((prefix, keyspace)) = s.rsplit_once('=') else {
            return Err(format!("--route-prefix {s:?}: not PREFIX=KEYSPACE"));
        };
        if prefix.is_empty() {
            return Err(format!(
                "--route-prefix {s:?}: the prefix is empty (it would route every key)"
            ));
        }
        if keyspace.is_empty() {
            return Err(format!("--route-prefix {s:?}: no keyspace"));
        }
        Ok(RoutePrefix {
            prefix: Bytes::copy_from_slice(prefix.as_bytes()),
            keyspace: keyspace.to_owned(),
        })
    }
}

/// One keyspace a routed listener serves: its name and its services.
#[derive(Clone)]
pub struct Target {
    pub name: String,
    pub node: Node,
    pub kv: Arc<KvService>,
    pub watch: Arc<WatchService>,
    pub lease: Arc<LeaseService>,
}

impl Target {
    /// The services of keyspace `name`.
    pub fn new(
        name: &str,
        node: &Node,
        hub: &pgetcd_watchbus::Hub,
        watch: crate::services::WatchSettings,
        shutdown: &tokio::sync::watch::Receiver<bool>,
    ) -> Target {
        Target {
            name: name.to_owned(),
            node: node.clone(),
            kv: Arc::new(KvService::new(node.clone())),
            watch: Arc::new(WatchService::new(
                node.clone(),
                hub.clone(),
                watch,
                shutdown.clone(),
            )),
            lease: Arc::new(LeaseService::new(node.clone(), shutdown.clone())),
        }
    }
}

/// A key interval `[start, end)`; `end` None: no upper bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    start: Bytes,
    end: Option<Bytes>,
}

impl Span {
    /// The keys of an etcd request's `key` and `range_end`: one key when `range_end`
    /// is empty, every key from `key` on when it is `\0`.
    fn of_request(key: &[u8], range_end: &[u8]) -> Span {
        let start = Bytes::copy_from_slice(key);
        let end = match range_end {
            [] => {
                let mut next = key.to_vec();
                next.push(0);
                Some(Bytes::from(next))
            }
            [0] => None,
            end => Some(Bytes::copy_from_slice(end)),
        };
        Span { start, end }
    }

    /// The keys starting with `prefix`.
    fn of_prefix(prefix: &[u8]) -> Span {
        let mut end = prefix.to_vec();
        while let Some(last) = end.pop() {
            if last < 0xff {
                end.push(last + 1);
                return Span {
                    start: Bytes::copy_from_slice(prefix),
                    end: Some(Bytes::from(end)),
                };
            }
        }
        Span {
            start: Bytes::copy_from_slice(prefix),
            end: None,
        }
    }

    fn is_empty(&self) -> bool {
        self.end.as_ref().is_some_and(|e| *e <= self.start)
    }

    /// Whether `at` lies below this span's end.
    fn below_end(&self, at: &[u8]) -> bool {
        self.end.as_ref().is_none_or(|e| at < &e[..])
    }

    fn intersects(&self, other: &Span) -> bool {
        !self.is_empty()
            && !other.is_empty()
            && other.below_end(&self.start)
            && self.below_end(&other.start)
    }
}

/// The spans of `prefixes`, each with the index of its keyspace in `names` (0: the
/// listener's own, which no prefix may name), sorted; refuses unknown keyspaces and
/// overlapping prefixes.
pub fn spans(prefixes: &[RoutePrefix], names: &[&str]) -> Result<Vec<(Span, usize)>, String> {
    let mut spans = Vec::new();
    for p in prefixes {
        let shown = format!(
            "--route-prefix {}={}",
            String::from_utf8_lossy(&p.prefix),
            p.keyspace
        );
        match names.iter().position(|n| *n == p.keyspace) {
            None => {
                return Err(format!(
                    "{shown}: this process serves no keyspace {:?} (declare it with --serve-keyspace)",
                    p.keyspace
                ));
            }
            Some(0) => {
                return Err(format!(
                    "{shown}: that is the listener's own keyspace, which serves every key not routed"
                ));
            }
            Some(i) => spans.push((Span::of_prefix(&p.prefix), i)),
        }
    }
    spans.sort_by(|a, b| a.0.start.cmp(&b.0.start));
    for pair in spans.windows(2) {
        if pair[0].0.intersects(&pair[1].0) {
            return Err(format!(
                "--route-prefix: prefixes {:?} and {:?} overlap",
                String::from_utf8_lossy(&pair[0].0.start),
                String::from_utf8_lossy(&pair[1].0.start)
            ));
        }
    }
    Ok(spans)
}

/// The routing table of a listener: disjoint prefixes, each to a keyspace; every other
/// key to keyspace 0, the listener's own.
pub struct Routes {
    /// Index 0: the listener's own keyspace.
    targets: Vec<Target>,
    /// Sorted by start, disjoint: the keys of each prefix and its target's index.
    spans: Vec<(Span, usize)>,
}

/// A request whose keys fall in several keyspaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spanning(pub Vec<String>);

impl Spanning {
    /// The error a client gets.
    pub fn message(&self) -> String {
        format!(
            "pgetcd: the request spans keyspaces {}; a request, txn or watch must stay within one keyspace",
            self.0.join(", ")
        )
    }

    pub fn status(&self) -> tonic::Status {
        tonic::Status::invalid_argument(self.message())
    }
}

impl Routes {
    /// The table of `prefixes` over `targets` (index 0 the listener's own keyspace;
    /// each prefix names one of the others).
    pub fn new(targets: Vec<Target>, prefixes: &[RoutePrefix]) -> Result<Routes, String> {
        let names: Vec<&str> = targets.iter().map(|t| t.name.as_str()).collect();
        let spans = spans(prefixes, &names)?;
        Ok(Routes { targets, spans })
    }

    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// The keyspaces holding keys of `span`, as indexes.
    fn keyspaces_of(&self, span: &Span, into: &mut BTreeSet<usize>) {
        if span.is_empty() {
            return;
        }
        // Walks the routed prefixes across the span; a gap before, between or after
        // them is the listener's own keyspace. `cursor`: how far the walk covered
        // (None: to the end of the keys).
        let mut cursor = Some(span.start.clone());
        for (s, i) in &self.spans {
            if !s.intersects(span) {
                continue;
            }
            let Some(at) = &cursor else { break };
            if s.start > *at {
                into.insert(0);
            }
            into.insert(*i);
            cursor = s.end.clone();
        }
        if let Some(at) = cursor
            && span.below_end(&at)
        {
            into.insert(0);
        }
    }

    /// The one keyspace of a request's `key` and `range_end` (an empty range: the
    /// listener's own, which answers it as etcd does).
    pub fn route(&self, key: &[u8], range_end: &[u8]) -> Result<usize, Spanning> {
        let mut set = BTreeSet::new();
        self.add(key, range_end, &mut set);
        self.one(&set)
    }

    fn add(&self, key: &[u8], range_end: &[u8], set: &mut BTreeSet<usize>) {
        if key.is_empty() && range_end.is_empty() {
            // No key (refused by the engine as etcd does).
            return;
        }
        self.keyspaces_of(&Span::of_request(key, range_end), set);
    }

    fn one(&self, set: &BTreeSet<usize>) -> Result<usize, Spanning> {
        match set.len() {
            0 => Ok(0),
            1 => Ok(set.iter().next().copied().unwrap_or(0)),
            _ => Err(Spanning(
                set.iter().map(|i| self.targets[*i].name.clone()).collect(),
            )),
        }
    }

    /// The one keyspace of every key a Txn compares, reads or writes.
    pub fn route_txn(&self, txn: &TxnRequest) -> Result<usize, Spanning> {
        let mut set = BTreeSet::new();
        self.add_txn(txn, &mut set);
        self.one(&set)
    }

    fn add_txn(&self, txn: &TxnRequest, set: &mut BTreeSet<usize>) {
        for c in &txn.compare {
            self.add(&c.key, &c.range_end, set);
        }
        for op in txn.success.iter().chain(&txn.failure) {
            self.add_op(op, set);
        }
    }

    fn add_op(&self, op: &RequestOp, set: &mut BTreeSet<usize>) {
        match &op.request {
            Some(Op::RequestRange(r)) => self.add(&r.key, &r.range_end, set),
            Some(Op::RequestPut(p)) => self.add(&p.key, &[], set),
            Some(Op::RequestDeleteRange(d)) => self.add(&d.key, &d.range_end, set),
            Some(Op::RequestTxn(t)) => self.add_txn(t, set),
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The keyspaces of a range, by name, under `prefixes` (no services: the walk
    /// reads the spans only).
    fn names(prefixes: &[(&str, usize)], key: &[u8], end: &[u8]) -> Vec<String> {
        let mut spans: Vec<(Span, usize)> = prefixes
            .iter()
            .map(|(p, i)| (Span::of_prefix(p.as_bytes()), *i))
            .collect();
        spans.sort_by(|a, b| a.0.start.cmp(&b.0.start));
        let routes = Routes {
            targets: Vec::new(),
            spans,
        };
        let mut set = BTreeSet::new();
        routes.keyspaces_of(&Span::of_request(key, end), &mut set);
        let names = ["main", "events", "crds"];
        set.into_iter().map(|i| names[i].to_owned()).collect()
    }

    #[test]
    fn ranges_fall_in_the_keyspaces_they_touch() {
        let t = [("/registry/events/", 1), ("/registry/crd.example/", 2)];
        let k = |s: &str| s.as_bytes().to_vec();
        assert_eq!(names(&t, b"/registry/events/a", b""), ["events"]);
        assert_eq!(names(&t, b"/registry/pods/a", b""), ["main"]);
        assert_eq!(names(&t, b"health", b""), ["main"]);
        // The prefix itself, and a range exactly over it.
        assert_eq!(names(&t, b"/registry/events/", b""), ["events"]);
        assert_eq!(
            names(&t, b"/registry/events/", b"/registry/events0"),
            ["events"]
        );
        // A range one key past the prefix reaches the main keyspace.
        assert_eq!(
            names(&t, b"/registry/events/", b"/registry/events0\0"),
            ["main", "events"]
        );
        assert_eq!(
            names(&t, &k("/registry/"), &k("/registry0")),
            ["main", "events", "crds"]
        );
        assert_eq!(names(&t, b"\0", b"\0"), ["main", "events", "crds"]);
        // From a key on: only what sorts after it ("/registry/crd.example/" sorts
        // before).
        assert_eq!(names(&t, b"/registry/events/x", b"\0"), ["main", "events"]);
        assert_eq!(names(&t, b"/registry/pods/", b"/registry/pods0"), ["main"]);
        // Empty ranges touch nothing.
        assert!(names(&t, b"b", b"a").is_empty());
    }

    #[test]
    fn adjacent_prefixes_of_one_keyspace_leave_no_gap() {
        let t = [("a", 1), ("b", 1)];
        assert_eq!(names(&t, b"a", b"c"), ["events"]);
        assert_eq!(names(&t, b"a", b"c\0"), ["main", "events"]);
        assert_eq!(names(&t, b"0", b"b"), ["main", "events"]);
    }

    #[test]
    fn tables_naming_unknown_or_own_keyspaces_or_overlapping_prefixes_are_refused() {
        let p = |s: &str| s.parse::<RoutePrefix>().expect("valid");
        let names = ["main", "events"];
        assert!(spans(&[p("/registry/events/=events")], &names).is_ok());
        let e = spans(&[p("/registry/events/=nope")], &names).expect_err("refused");
        assert!(e.contains("no keyspace \"nope\""), "{e}");
        let e = spans(&[p("/registry/pods/=main")], &names).expect_err("refused");
        assert!(e.contains("own keyspace"), "{e}");
        let e = spans(
            &[p("/registry/=events"), p("/registry/events/=events")],
            &names,
        )
        .expect_err("refused");
        assert!(e.contains("overlap"), "{e}");
    }

    #[test]
    fn prefix_flags_parse_and_bad_ones_say_why() {
        let r: RoutePrefix = "/registry/events/=events".parse().expect("valid");
        assert_eq!(&r.prefix[..], b"/registry/events/");
        assert_eq!(r.keyspace, "events");
        let r: RoutePrefix = "/a=b/=ks".parse().expect("valid");
        assert_eq!(&r.prefix[..], b"/a=b/");
        for bad in ["=events", "/registry/", "/x="] {
            assert!(bad.parse::<RoutePrefix>().is_err(), "{bad}");
        }
    }

    #[test]
    fn spans_of_requests_and_prefixes() {
        assert_eq!(
            Span::of_prefix(b"a\xff"),
            Span {
                start: Bytes::from_static(b"a\xff"),
                end: Some(Bytes::from_static(b"b"))
            }
        );
        // A prefix of 0xff bytes has no upper bound.
        assert_eq!(Span::of_prefix(b"\xff\xff").end, None);
        assert!(Span::of_request(b"b", b"a").is_empty());
        assert!(!Span::of_request(b"a", b"").is_empty());
        assert!(!Span::of_request(b"a", b"\0").is_empty());
    }
}
