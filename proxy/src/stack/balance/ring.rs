//! Consistent hashing (Envoy's `RING_HASH`): every endpoint owns virtual nodes on
//! a ring of 64-bit positions, and a request's key goes to the first endpoint at or
//! after its hash, so one key keeps reaching one endpoint and an endpoint that
//! leaves moves only its own keys.

use std::net::{IpAddr, SocketAddr};

/// Ring positions at least (Envoy's minimum is 1024): shares of the key space
/// then stay within a few % of even for up to ten endpoints.
const RING_MIN: usize = 4096;
/// Positions per endpoint at least, so larger sets stay within about 25 %.
const VNODES_MIN: usize = 160;

/// The stable hash used for ring-hash keys (header value bytes or source IP bytes):
/// deterministic across processes.
///
/// XXH64 with seed 0, as Envoy hashes its ring, so the value is pinned by the
/// published test vectors rather than by this build's `std` hasher.
pub fn hash_key(bytes: &[u8]) -> u64 {
    xxh64(bytes)
}

/// The first endpoint `admits` takes at or after `hash` on the ring (`(position,
/// endpoint index)` sorted by position, not empty), so only the keys of a skipped
/// endpoint move, each to its ring successor.
pub fn pick(ring: &[(u64, usize)], hash: u64, admits: impl Fn(usize) -> bool) -> usize {
    let len = ring.len();
    let start = ring.partition_point(|&(position, _)| position < hash);
    (0..len)
        .map(|step| ring[(start + step) % len].1)
        .find(|&i| admits(i))
        .unwrap_or(ring[start % len].1)
}

/// Endpoints' virtual nodes hashed from address, port and replica number, so
/// every proxy builds the same ring from the same endpoint set.
pub fn build(endpoints: &[SocketAddr]) -> Box<[(u64, usize)]> {
    if endpoints.is_empty() {
        return Box::default();
    }
    let replicas = RING_MIN.div_ceil(endpoints.len()).max(VNODES_MIN);
    let mut ring = Vec::with_capacity(replicas.saturating_mul(endpoints.len()));
    for (index, addr) in endpoints.iter().enumerate() {
        let mut key = [0u8; 22];
        let ip_len = match addr.ip() {
            IpAddr::V4(ip) => {
                key[..4].copy_from_slice(&ip.octets());
                4
            }
            IpAddr::V6(ip) => {
                key[..16].copy_from_slice(&ip.octets());
                16
            }
        };
        key[ip_len..ip_len + 2].copy_from_slice(&addr.port().to_be_bytes());
        for replica in 0..replicas as u32 {
            key[ip_len + 2..ip_len + 6].copy_from_slice(&replica.to_be_bytes());
            ring.push((hash_key(&key[..ip_len + 6]), index));
        }
    }
    ring.sort_unstable();
    ring.into_boxed_slice()
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

fn xxh64(input: &[u8]) -> u64 {
    fn round(acc: u64, lane: u64) -> u64 {
        acc.wrapping_add(lane.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    }
    fn merge(acc: u64, lane: u64) -> u64 {
        (acc ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4)
    }
    /// Little-endian value of up to 8 bytes.
    fn le(bytes: &[u8]) -> u64 {
        bytes
            .iter()
            .rev()
            .fold(0, |acc, &b| (acc << 8) | u64::from(b))
    }

    let stripes = input.chunks_exact(32);
    let mut rest = stripes.remainder();
    let mut hash = if input.len() >= 32 {
        let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
        for stripe in stripes {
            for (acc, lane) in v.iter_mut().zip(stripe.chunks_exact(8)) {
                *acc = round(*acc, le(lane));
            }
        }
        let mut h = v[0]
            .rotate_left(1)
            .wrapping_add(v[1].rotate_left(7))
            .wrapping_add(v[2].rotate_left(12))
            .wrapping_add(v[3].rotate_left(18));
        for lane in v {
            h = merge(h, lane);
        }
        h
    } else {
        P5
    };
    hash = hash.wrapping_add(input.len() as u64);
    while rest.len() >= 8 {
        hash ^= round(0, le(&rest[..8]));
        hash = hash.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
        rest = &rest[8..];
    }
    if rest.len() >= 4 {
        hash ^= le(&rest[..4]).wrapping_mul(P1);
        hash = hash.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
        rest = &rest[4..];
    }
    for &byte in rest {
        hash ^= u64::from(byte).wrapping_mul(P5);
        hash = hash.rotate_left(11).wrapping_mul(P1);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(P2);
    hash ^= hash >> 29;
    hash = hash.wrapping_mul(P3);
    hash ^ (hash >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_key_is_xxh64() {
        // The published XXH64 (seed 0) vectors; the last one covers the 32-byte stripes.
        assert_eq!(hash_key(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(hash_key(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(hash_key(b"abc"), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            hash_key(b"The quick brown fox jumps over the lazy dog"),
            0x0B24_2D36_1FDA_71BC
        );
    }
}
