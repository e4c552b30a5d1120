//! The commands the chart and the injector write are ones the binaries accept. No
//! container runtime runs here to build the image (`Dockerfile`), so this checks
//! what can be checked: the control plane's Deployment args (the chart rendered by
//! the real helm), and the init step, proxy and postStart hook of both golden
//! injection patches, each run against the binaries the build made (`--help`
//! after the flags, which parse first, or init's own dry run); and every
//! environment variable the injector sets is one the proxy reads.

use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};
use trellis_tests::{
    kube::tool,
    sidecar::{control_plane_bin, proxy_bin},
};

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The binary a container's `command[0]` names, as the build made it.
fn binary(name: &str) -> PathBuf {
    match name {
        "trellis-proxy" => proxy_bin(),
        "trellis-control-plane" => control_plane_bin(),
        other => panic!("a command the image does not hold: {other}"),
    }
}

/// Runs a container's command (`command` then `args`) with `more` after it;
/// panics with its output unless it succeeds.
fn accepted(command: &[String], more: &[&str]) -> String {
    let output = std::process::Command::new(binary(&command[0]))
        .args(&command[1..])
        .args(more)
        .output()
        .expect("run the binary");
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "{command:?} {more:?} refused:\n{printed}"
    );
    printed
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// `command` followed by `args` of a container.
fn command_of(container: &Value) -> Vec<String> {
    let mut command = strings(&container["command"]);
    command.extend(strings(&container["args"]));
    command
}

#[test]
fn the_charts_control_plane_command_is_one_the_binary_accepts() {
    let output = std::process::Command::new(tool("helm"))
        .args(["template", "trellis"])
        .arg(repo().join("charts/trellis"))
        .args(["--namespace", "trellis-system"])
        .output()
        .expect("run helm");
    assert!(output.status.success());
    let text = String::from_utf8(output.stdout).unwrap();
    let deployment = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde_json::to_value(serde_yaml_ng::Value::deserialize(d).unwrap()).unwrap())
        .find(|o| o["kind"] == "Deployment")
        .expect("a Deployment");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    let command = command_of(container);
    assert_eq!(command[0], "trellis-control-plane");
    assert!(command.len() > 10, "{command:?}");
    accepted(&command, &["--help"]);
}

#[test]
fn the_injected_init_step_proxy_and_hook_are_commands_the_proxy_accepts() {
    for golden in ["inject-classic.json", "inject-native.json"] {
        let text = std::fs::read_to_string(repo().join("tests/golden").join(golden)).unwrap();
        let patch: Value = serde_json::from_str(&text).unwrap();
        let containers: Vec<&Value> = patch
            .as_array()
            .unwrap()
            .iter()
            .filter(|op| op["path"].as_str().unwrap().contains("ontainers"))
            .flat_map(|op| match &op["value"] {
                Value::Array(list) => list.iter().collect(),
                one => vec![one],
            })
            .collect();
        let by_name = |name: &str| {
            containers
                .iter()
                .find(|c| c["name"] == name)
                .unwrap_or_else(|| panic!("{golden}: no {name}"))
        };
        let init = command_of(by_name("trellis-init"));
        let printed = accepted(&init, &["--dry-run", "--iptables-backend", "nft"]);
        assert!(
            printed.contains("-A TRELLIS_INBOUND -p tcp --dport 22 -j RETURN"),
            "{printed}"
        );

        let proxy = by_name("trellis-proxy");
        let help = accepted(&command_of(proxy), &["--help"]);
        for env in proxy["env"].as_array().unwrap() {
            let name = env["name"].as_str().unwrap();
            // RUST_LOG is the log filter, read by the logger rather than a flag.
            assert!(
                name == "RUST_LOG" || help.contains(&format!("env: {name}=")),
                "{golden}: trellis-proxy run does not read {name}:\n{help}"
            );
        }
        if let Some(hook) = proxy["lifecycle"]["postStart"]["exec"]["command"].as_array() {
            let hook: Vec<String> = hook
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect();
            accepted(&hook, &["--help"]);
        }
    }
}
