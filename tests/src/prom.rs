//! Reads Prometheus text exposition, enough to check what a proxy counted, and
//! has Prometheus's own linter judge it ([`promtool_check`]).

/// A sample's labels, in the order the exporter wrote them.
pub type Labels = Vec<(String, String)>;

/// One scrape: `(name, labels, value)` for every sample.
pub struct Metrics(Vec<(String, Labels, f64)>);

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut samples = Vec::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        {
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, parse_labels(rest.trim_end_matches('}'))),
                None => (series, Vec::new()),
            };
            samples.push((name.to_owned(), labels, value));
        }
        Metrics(samples)
    }

    /// The sum of every sample of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.0
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, _, v)| v)
            .sum::<f64>()
            + 0.0 // an empty f64 sum is -0.0; print it as 0
    }

    /// Every label set of `name`, for assertions about what labels exist.
    pub fn label_sets(&self, name: &str) -> Vec<&[(String, String)]> {
        self.0
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, _)| l.as_slice())
            .collect()
    }
}

/// What `promtool check metrics` (Prometheus's linter for the text format, from
/// Debian's `prometheus` package, which `scripts/setup` installs) says of
/// `exposition`: `Ok` when it exits 0 and prints nothing, else everything it
/// printed.
pub fn promtool_check(exposition: &str) -> Result<(), String> {
    use std::{
        io::Write,
        process::{Command, Stdio},
    };
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!("cannot run promtool ({e}): run scripts/setup first (scripts/test does)")
        });
    let mut stdin = child.stdin.take().expect("promtool's stdin is piped");
    stdin
        .write_all(exposition.as_bytes())
        .expect("write to promtool");
    drop(stdin);
    let output = child.wait_with_output().expect("wait for promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if output.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!(
            "promtool check metrics ({}):\n{said}",
            output.status
        ))
    }
}

fn parse_labels(text: &str) -> Labels {
    let mut labels = Vec::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let Some(end) = after.find('"') else { break };
        labels.push((
            key.trim_start_matches(',').to_owned(),
            after[..end].to_owned(),
        ));
        rest = &after[end + 1..];
    }
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_matching_samples() {
        let m = Metrics::parse(
            "# TYPE x counter\nx{a=\"1\",b=\"2\"} 3\nx{a=\"1\",b=\"3\"} 4\nx{a=\"2\"} 10\ny 1\n",
        );
        assert_eq!(m.sum("x", &[("a", "1")]), 7.0);
        assert_eq!(m.sum("x", &[]), 17.0);
        assert_eq!(m.sum("y", &[]), 1.0);
        assert_eq!(m.sum("x", &[("b", "9")]), 0.0);
    }

    #[test]
    fn promtool_passes_described_metrics_and_names_undescribed_ones() {
        let described = "# HELP x_total Things.\n# TYPE x_total counter\nx_total 1\n";
        assert_eq!(promtool_check(described), Ok(()));
        let bare = "# TYPE x_total counter\nx_total 1\n";
        let said = promtool_check(bare).unwrap_err();
        assert!(said.contains("x_total no help text"), "{said}");
    }
}
