//! Criterion benchmarks live in `benches/`; run them with
//! `cargo bench -p pgetcd-benches`.
//!
//! This library holds what several bench targets share: Kubernetes-like keys and
//! etcd's prefix convention.

/// Pods per namespace in [`pod_key`]'s layout.
pub const PODS_PER_NAMESPACE: usize = 1000;

/// Pods per deployment in [`pod_key`]'s layout.
const PODS_PER_DEPLOYMENT: usize = 10;
const _: () = assert!(PODS_PER_DEPLOYMENT <= NAME_ALPHABET.len());

/// Letters Kubernetes uses in generated name suffixes.
const NAME_ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";

/// splitmix64: a fixed, cheap pseudo-random sequence for reproducible keys.
pub fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn push_suffix(out: &mut String, seed: u64, len: usize) {
    let mut h = mix(seed);
    for _ in 0..len {
        let n = NAME_ALPHABET.len() as u64;
        out.push(char::from(NAME_ALPHABET[(h % n) as usize]));
        h /= n;
    }
}

/// The `i`-th pod key, as kube-apiserver stores it:
/// `/registry/pods/namespace-0042/app-017-7d4b9c8f6d-x2k9p` (namespace `i / 1000`,
/// deployment `i % 1000 / 10`, a replica-set hash and a pod hash). Keys of one
/// namespace are contiguous in key order; namespace numbers have four digits, so
/// `/registry/pods/namespace-00` holds the first 100 namespaces.
pub fn pod_key(i: usize) -> String {
    let ns = i / PODS_PER_NAMESPACE;
    let deployment = i % PODS_PER_NAMESPACE / PODS_PER_DEPLOYMENT;
    let mut key = format!("/registry/pods/namespace-{ns:04}/app-{deployment:03}-");
    push_suffix(&mut key, (ns * PODS_PER_NAMESPACE + deployment) as u64, 10);
    key.push('-');
    // The replica number as first letter keeps the keys distinct.
    key.push(char::from(NAME_ALPHABET[i % PODS_PER_DEPLOYMENT]));
    push_suffix(&mut key, i as u64 | 1 << 63, 4);
    key
}

/// The prefix holding namespace `ns`'s pods.
pub fn namespace_prefix(ns: usize) -> String {
    format!("/registry/pods/namespace-{ns:04}/")
}

/// etcd's range end for "every key with this prefix" (clientv3 `GetPrefixRangeEnd`):
/// the prefix with its last byte below 0xff incremented and the rest dropped;
/// `[0]` (no end) when every byte is 0xff.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    match prefix.iter().rposition(|&b| b < 0xff) {
        Some(i) => {
            let mut end = prefix[..=i].to_vec();
            end[i] += 1;
            end
        }
        None => vec![0],
    }
}

/// Criterion settings of these benches: 1 s warm-up, `measure_secs` of measurement
/// (short enough for the whole set to run in minutes on a small machine).
pub fn criterion_config(measure_secs: u64) -> criterion::Criterion {
    criterion::Criterion::default()
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(measure_secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_distinct_and_grouped_by_namespace() {
        let keys: Vec<String> = (0..2 * PODS_PER_NAMESPACE).map(pod_key).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), keys.len());
        let p = namespace_prefix(1);
        let end = prefix_end(p.as_bytes());
        let in_ns1 = keys
            .iter()
            .filter(|k| k.as_bytes() >= p.as_bytes() && k.as_bytes() < end.as_slice())
            .count();
        assert_eq!(in_ns1, PODS_PER_NAMESPACE);
        assert_eq!(prefix_end(b"a/"), b"a0".to_vec());
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b".to_vec());
        assert_eq!(prefix_end(&[0xff]), vec![0]);
    }
}
