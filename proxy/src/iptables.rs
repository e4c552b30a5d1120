//! `trellis-proxy init`: the pod's nat rules that send its TCP through the proxy.
//!
//! Everything lives in Trellis's own chains, reached by one jump from PREROUTING
//! (inbound) and one from OUTPUT (outbound), so cleanup removes exactly what init
//! added and init can run again (it cleans up first) with the same result.
//!
//! ```text
//! PREROUTING -p tcp -> TRELLIS_INBOUND:  excluded ports RETURN, else -> TRELLIS_IN_REDIRECT (:inbound)
//! OUTPUT     -p tcp -> TRELLIS_OUTPUT:   proxy uid/gid RETURN, loopback RETURN,
//!                                        excluded ports/CIDRs RETURN, else -> TRELLIS_REDIRECT (:outbound)
//! ```

use std::{fmt, net::IpAddr, process::Command, str::FromStr};

pub const INBOUND_CHAIN: &str = "TRELLIS_INBOUND";
pub const IN_REDIRECT_CHAIN: &str = "TRELLIS_IN_REDIRECT";
pub const OUTPUT_CHAIN: &str = "TRELLIS_OUTPUT";
pub const REDIRECT_CHAIN: &str = "TRELLIS_REDIRECT";

/// The jumps from the built-in chains into Trellis's chains.
const JUMPS: [(&str, &str); 2] = [("PREROUTING", INBOUND_CHAIN), ("OUTPUT", OUTPUT_CHAIN)];
const CHAINS: [&str; 4] = [
    INBOUND_CHAIN,
    IN_REDIRECT_CHAIN,
    OUTPUT_CHAIN,
    REDIRECT_CHAIN,
];

/// What init redirects and what it leaves alone.
#[derive(Debug, Clone)]
pub struct Rules {
    pub proxy_uid: u32,
    pub proxy_gid: u32,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// Never redirected inbound, in addition to `exclude_inbound_ports` (the admin
    /// port, so probes and scrapes reach the proxy itself).
    pub admin_port: u16,
    pub exclude_inbound_ports: Vec<u16>,
    pub exclude_outbound_ports: Vec<u16>,
    pub exclude_outbound_cidrs: Vec<Cidr>,
}

/// An address range such as `198.18.0.0/15` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR: {addr:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} is not a CIDR: prefix must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn args(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_owned).collect()
}

impl Rules {
    /// The `iptables -t nat` argument lists that install the rules, in order.
    /// IPv6 CIDRs are left to ip6tables, which Trellis does not manage yet.
    pub fn install_commands(&self) -> Vec<Vec<String>> {
        let mut commands: Vec<Vec<String>> =
            CHAINS.iter().map(|c| args(&format!("-N {c}"))).collect();
        commands.push(args(&format!(
            "-A {IN_REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.inbound_port
        )));
        commands.push(args(&format!(
            "-A {REDIRECT_CHAIN} -p tcp -j REDIRECT --to-ports {}",
            self.outbound_port
        )));

        let mut inbound_excluded = vec![self.admin_port];
        inbound_excluded.extend(&self.exclude_inbound_ports);
        inbound_excluded.dedup();
        for port in inbound_excluded {
            commands.push(args(&format!(
                "-A {INBOUND_CHAIN} -p tcp --dport {port} -j RETURN"
            )));
        }
        commands.push(args(&format!(
            "-A {INBOUND_CHAIN} -p tcp -j {IN_REDIRECT_CHAIN}"
        )));

        // The proxy's own connections must never come back to it.
        commands.push(args(&format!(
            "-A {OUTPUT_CHAIN} -m owner --uid-owner {} -j RETURN",
            self.proxy_uid
        )));
        commands.push(args(&format!(
            "-A {OUTPUT_CHAIN} -m owner --gid-owner {} -j RETURN",
            self.proxy_gid
        )));
        commands.push(args(&format!("-A {OUTPUT_CHAIN} -o lo -j RETURN")));
        for port in &self.exclude_outbound_ports {
            commands.push(args(&format!(
                "-A {OUTPUT_CHAIN} -p tcp --dport {port} -j RETURN"
            )));
        }
        for cidr in self
            .exclude_outbound_cidrs
            .iter()
            .filter(|c| c.addr.is_ipv4())
        {
            commands.push(args(&format!("-A {OUTPUT_CHAIN} -d {cidr} -j RETURN")));
        }
        commands.push(args(&format!(
            "-A {OUTPUT_CHAIN} -p tcp -j {REDIRECT_CHAIN}"
        )));

        for (builtin, chain) in JUMPS {
            commands.push(args(&format!("-A {builtin} -p tcp -j {chain}")));
        }
        commands
    }
}

/// The argument lists that remove what [`Rules::install_commands`] added: the jumps
/// first, then the emptied chains. Each may fail harmlessly when already gone.
pub fn cleanup_commands() -> Vec<Vec<String>> {
    let mut commands = Vec::new();
    for (builtin, chain) in JUMPS {
        commands.push(args(&format!("-D {builtin} -p tcp -j {chain}")));
    }
    for chain in CHAINS {
        commands.push(args(&format!("-F {chain}")));
    }
    for chain in CHAINS {
        commands.push(args(&format!("-X {chain}")));
    }
    commands
}

/// Why init could not finish.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot run iptables (is it installed? `apt-get install -y iptables`): {0}")]
    Spawn(std::io::Error),
    #[error("`{backend} -t nat {command}` failed: {stderr}")]
    Failed {
        backend: &'static str,
        command: String,
        stderr: String,
    },
}

/// Which iptables writes the rules. A node's kernel filters with nf_tables or
/// with the legacy tables, and rules written with the other are silently
/// ignored, so init uses the one the node does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Nft,
    Legacy,
    /// `iptables` as installed, when neither variant is.
    Plain,
}

impl Backend {
    pub fn command(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
            Backend::Plain => "iptables",
        }
    }

    /// As iptables-wrapper chooses: the variant that already holds more rules
    /// here (whatever the node or the CNI wrote); on a tie, the one `iptables`
    /// itself is (`iptables --version` says `nf_tables` or `legacy`).
    pub fn detect() -> Backend {
        let rules = |save: &str| -> Option<usize> {
            let output = Command::new(save).output().ok()?;
            output.status.success().then(|| {
                String::from_utf8_lossy(&output.stdout)
                    .lines()
                    .filter(|line| line.starts_with("-A"))
                    .count()
            })
        };
        match (rules("iptables-nft-save"), rules("iptables-legacy-save")) {
            (None, None) => Backend::Plain,
            (Some(_), None) => Backend::Nft,
            (None, Some(_)) => Backend::Legacy,
            (Some(nft), Some(legacy)) if nft > legacy => Backend::Nft,
            (Some(nft), Some(legacy)) if legacy > nft => Backend::Legacy,
            _ => {
                let version = Command::new("iptables")
                    .arg("--version")
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if version.contains("legacy") {
                    Backend::Legacy
                } else {
                    Backend::Nft
                }
            }
        }
    }
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Backend, String> {
        match s {
            "nft" => Ok(Backend::Nft),
            "legacy" => Ok(Backend::Legacy),
            other => Err(format!(
                "{other:?} is not an iptables backend (nft, legacy)"
            )),
        }
    }
}

fn iptables(backend: Backend, arguments: &[String]) -> Result<(), InitError> {
    let output = Command::new(backend.command())
        .args(["-w", "5", "-t", "nat"])
        .args(arguments)
        .output()
        .map_err(InitError::Spawn)?;
    if output.status.success() {
        Ok(())
    } else {
        Err(InitError::Failed {
            backend: backend.command(),
            command: arguments.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

/// Removes Trellis's rules; rules and chains that are not there are fine.
pub fn cleanup(backend: Backend) -> Result<(), InitError> {
    for command in cleanup_commands() {
        // A jump may have been added more than once by hand: delete until gone.
        let deleting = command[0] == "-D";
        loop {
            match iptables(backend, &command) {
                Ok(()) if deleting => continue,
                Ok(()) => break,
                Err(InitError::Spawn(e)) => return Err(InitError::Spawn(e)),
                Err(InitError::Failed { .. }) => break,
            }
        }
    }
    Ok(())
}

/// Replaces any earlier Trellis rules with `rules`.
pub fn install(rules: &Rules, backend: Backend) -> Result<(), InitError> {
    cleanup(backend)?;
    for command in rules.install_commands() {
        iptables(backend, &command)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            proxy_uid: 1337,
            proxy_gid: 1337,
            outbound_port: 15001,
            inbound_port: 15006,
            admin_port: 15020,
            exclude_inbound_ports: vec![22],
            exclude_outbound_ports: vec![5432],
            exclude_outbound_cidrs: vec!["198.19.0.0/16".parse().unwrap()],
        }
    }

    fn lines(commands: Vec<Vec<String>>) -> Vec<String> {
        commands.into_iter().map(|c| c.join(" ")).collect()
    }

    #[test]
    fn redirects_with_exclusions_in_order() {
        let lines = lines(rules().install_commands());
        let pos = |rule: &str| {
            lines
                .iter()
                .position(|l| l == rule)
                .unwrap_or_else(|| panic!("missing {rule:?} in {lines:#?}"))
        };
        let admin = pos("-A TRELLIS_INBOUND -p tcp --dport 15020 -j RETURN");
        let ssh = pos("-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN");
        let inbound = pos("-A TRELLIS_INBOUND -p tcp -j TRELLIS_IN_REDIRECT");
        assert!(admin < inbound && ssh < inbound);
        pos("-A TRELLIS_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006");
        pos("-A TRELLIS_REDIRECT -p tcp -j REDIRECT --to-ports 15001");
        let uid = pos("-A TRELLIS_OUTPUT -m owner --uid-owner 1337 -j RETURN");
        let lo = pos("-A TRELLIS_OUTPUT -o lo -j RETURN");
        let port = pos("-A TRELLIS_OUTPUT -p tcp --dport 5432 -j RETURN");
        let cidr = pos("-A TRELLIS_OUTPUT -d 198.19.0.0/16 -j RETURN");
        let redirect = pos("-A TRELLIS_OUTPUT -p tcp -j TRELLIS_REDIRECT");
        assert!([uid, lo, port, cidr].iter().all(|&p| p < redirect));
        // Jumps come last, so traffic is redirected only once the chains are whole.
        assert!(lines[lines.len() - 2..]
            .iter()
            .all(|l| l.starts_with("-A PREROUTING") || l.starts_with("-A OUTPUT")));
    }

    #[test]
    fn cleanup_unhooks_before_deleting_chains() {
        let lines = lines(cleanup_commands());
        assert_eq!(lines[0], "-D PREROUTING -p tcp -j TRELLIS_INBOUND");
        assert_eq!(lines[1], "-D OUTPUT -p tcp -j TRELLIS_OUTPUT");
        assert!(lines.last().unwrap().starts_with("-X "));
    }

    #[test]
    fn cidrs_parse_and_refuse_with_the_value_named() {
        assert_eq!(
            "198.18.0.0/15".parse::<Cidr>().unwrap().to_string(),
            "198.18.0.0/15"
        );
        assert_eq!("198.18.0.1".parse::<Cidr>().unwrap().prefix, 32);
        let err = "198.18.0.0/33".parse::<Cidr>().unwrap_err();
        assert!(
            err.contains("198.18.0.0/33") && err.contains("prefix"),
            "{err}"
        );
        let err = "nope/8".parse::<Cidr>().unwrap_err();
        assert!(err.contains("\"nope\""), "{err}");
    }
}
