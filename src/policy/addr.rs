//! Address normalisation at the edge: IPv4-mapped IPv6 peers become IPv4.

use std::net::IpAddr;

/// `::ffff:a.b.c.d` becomes `a.b.c.d`; every other address is unchanged.
#[inline]
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_becomes_v4() {
        let ip: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(canonical(ip), "192.0.2.7".parse::<IpAddr>().unwrap());
        let ip: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(canonical(ip), ip);
        let ip: IpAddr = "::1".parse().unwrap();
        assert_eq!(canonical(ip), ip);
    }
}
