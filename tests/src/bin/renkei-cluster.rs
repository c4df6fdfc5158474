//! HQ on a cluster, for a person to look at (`cargo xtask demo --cluster`): a throw-away
//! three-node NATS JetStream cluster, a throw-away PostgreSQL record, two `renkei-broker`
//! instances reading the cluster's replicated stream into that one record and serving the
//! dashboard, and `renkei-agent simulate` reporting through the cluster. The same parts the
//! cluster tests start (`renkei_testkit::nats`, `renkei_testkit::postgres`), so what the demo
//! shows is what the tests prove.
//!
//! Open like the embedded demo (`serve --demo`): anyone who can reach 127.0.0.1 may read and
//! publish. Type `kill node N`, `restart node N` or `kill instance a|b` (and Enter) to watch
//! the cluster ride through it; Ctrl-C or end of input stops everything.

use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::Parser;
use renkei_testkit::nats::NatsCluster;
use renkei_testkit::postgres::Postgres;
use renkei_testkit::{BrokerProcess, binary, write_config};

#[derive(Parser)]
#[command(about = "HQ on a cluster: three NATS nodes, PostgreSQL, two instances, simulated sites")]
struct Args {
    /// Simulated sites across the 23 wards.
    #[arg(long, default_value_t = 300)]
    sites: u32,
    /// The dashboard Trunk built (`dist`).
    #[arg(long, default_value = "dist")]
    dashboard: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut cluster = NatsCluster::start("");
    let record = Postgres::start();
    let mut instances = Vec::new();
    for (i, id) in ["renkei-hq-a", "renkei-hq-b"].iter().enumerate() {
        let dir = tempfile::tempdir()?;
        // Dashboards connect to the nodes' WebSocket listeners, the first instance's to the
        // first node, the second's to the second, and go on to the others when theirs is lost.
        write_config(dir.path(), &cluster.dashboard_config(i));
        let mut flags = cluster.instance_flags(i);
        flags.extend([
            "--demo".to_owned(),
            "--external-client-id".to_owned(),
            (*id).to_owned(),
            "--postgres".to_owned(),
            record.url(),
        ]);
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        instances.push(Some(BrokerProcess::start_serving(
            &args.dashboard,
            dir,
            &flags,
        )));
    }
    let state = tempfile::tempdir()?;
    let mut simulator = Command::new(binary("renkei-agent", "renkei-agent"))
        .args(["simulate", "--broker"])
        .arg(format!("mqtt://{}", cluster.nodes[2].mqtt()))
        .args(["--sites", &args.sites.to_string(), "--state-dir"])
        .arg(state.path())
        .stdin(Stdio::null())
        .spawn()
        .context("starting the simulator")?;

    println!();
    for (name, instance) in ["a", "b"].iter().zip(&instances) {
        if let Some(instance) = instance {
            println!(
                "  instance {name}: open http://{}/?mode=exercise",
                instance.addrs.http
            );
        }
    }
    for (i, node) in cluster.nodes.iter().enumerate() {
        println!(
            "  NATS node {i}: mqtt://{}  {}  {}",
            node.mqtt(),
            node.ws_url(),
            node.nats_url()
        );
    }
    println!("  PostgreSQL record: {}", record.url());
    println!(
        "  {} simulated sites (exercise) report through node 2",
        args.sites
    );
    println!();
    println!("  Type `kill node N`, `restart node N` or `kill instance a|b` (and Enter).");
    println!();

    for line in std::io::stdin().lock().lines() {
        let line = line?;
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["kill", "node", n] | ["restart", "node", n] => {
                let Some(i) = n.parse::<usize>().ok().filter(|i| *i < cluster.nodes.len()) else {
                    println!("  nodes are 0, 1 and 2");
                    continue;
                };
                if words[0] == "kill" {
                    cluster.kill9(i);
                    println!("  node {i} killed (SIGKILL)");
                } else {
                    cluster.restart(i);
                    println!("  node {i} restarted");
                }
            }
            ["kill", "instance", name @ ("a" | "b")] => {
                let i = usize::from(name == "b");
                match instances[i].take() {
                    Some(instance) => {
                        drop(instance.kill9_keeping_dir());
                        println!("  instance {name} killed (SIGKILL); the other carries on");
                    }
                    None => println!("  instance {name} is already gone"),
                }
            }
            [] => {}
            _ => println!("  unknown: {line}"),
        }
        if let Some(status) = simulator.try_wait()? {
            bail!("the simulator exited: {status}");
        }
    }
    let _ = simulator.kill();
    let _ = simulator.wait();
    Ok(())
}
