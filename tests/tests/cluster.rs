//! HQ on a clustered engine: a real three-node NATS JetStream cluster (Debian's nats-server
//! 2.9) whose MQTT listeners serve agents and dashboards, with permissions written by
//! `renkei-broker cluster-acl` from Renkei's users (docs/scaling.md).
//!
//! - [`the_clusters_permissions_keep_each_login_in_its_tree`]: an agent's report reaches HQ
//!   through another node; an agent cannot publish into another site's tree, a ward operator
//!   cannot read another ward, an integrator cannot publish, a wrong password is refused.
//! - [`clients_on_the_surviving_nodes_keep_working_when_a_node_is_killed`]: SIGKILL of one
//!   node; agents and dashboards on the other two exchange messages again, and the node
//!   rejoins.
//! - a `renkei-broker` in external mode reads the JetStream stream, receipts only what it
//!   recorded, and, through the kill of the node it was connected to, records every report
//!   an agent sends until receipted, once
//!   ([`an_instance_records_from_the_replicated_stream_and_receipts_after_the_commit`]).
//!
//! The tests run one at a time: each runs three nodes, whose elections slow down on a busy
//! machine.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use renkei_testkit::mqtt::{login_options, send_on};
use renkei_testkit::nats::NatsCluster;
use renkei_testkit::{
    BrokerProcess, MqttClient, PASSWORD, ROOT, USER_ROLES, add_user, eventually_within, metric,
    scrape, with_users,
};
use rumqttc::{ConnectReturnCode, QoS, SubscribeReasonCode};
use tempfile::TempDir;

/// The kit's users, each with a cluster password, as `cluster-acl` writes them for NATS; and
/// the broker directory that holds them.
fn authorization() -> Result<(TempDir, String)> {
    let dir = with_users("");
    for (name, args) in USER_ROLES {
        let mut args = args.to_vec();
        args.push("--cluster-password");
        add_user(dir.path(), name, &args, PASSWORD);
    }
    let out = dir.path().join("auth.conf");
    let status = Command::new(renkei_testkit::process::binary(
        "renkei-broker",
        "renkei-broker",
    ))
    .args(["cluster-acl", "--data"])
    .arg(dir.path().join("data"))
    .arg("--out")
    .arg(&out)
    .env_remove("RENKEI_BROKER_CONFIG")
    .stdin(Stdio::null())
    .status()?;
    ensure!(status.success(), "cluster-acl failed");
    let block = std::fs::read_to_string(Path::new(&out))?;
    Ok((dir, block))
}

/// The cluster, with the broker directory whose users it knows.
fn cluster_with_users() -> Result<Option<(NatsCluster, TempDir)>> {
    if !NatsCluster::installed() {
        eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
        return Ok(None);
    }
    let (dir, block) = authorization()?;
    Ok(Some((NatsCluster::start(&block), dir)))
}

/// One cluster at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster() -> Result<Option<NatsCluster>> {
    Ok(cluster_with_users()?.map(|(cluster, _)| cluster))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clusters_permissions_keep_each_login_in_its_tree() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(cluster) = cluster()? else {
        return Ok(());
    };
    let (a, b) = (cluster.nodes[0].mqtt(), cluster.nodes[1].mqtt());
    let mut sato = MqttClient::connect_as(b, "sato", PASSWORD).await;
    let codes = sato.subscribe_codes("renkei/v1/#").await;
    ensure!(
        codes
            .iter()
            .all(|c| !matches!(c, SubscribeReasonCode::Failure)),
        "HQ may read everything: {codes:?}"
    );
    let agent = MqttClient::connect_as(a, "agent-nishi", PASSWORD).await;

    // Its own report crosses the cluster, byte for byte.
    let status = renkei_shared::sample::status();
    let own = renkei_shared::Topic::of(&status)?.to_string();
    agent.send(&status).await;
    let got = sato.publish_on(&own, Duration::from_secs(10)).await;
    ensure!(
        got == Some(renkei_shared::encode(&status)?),
        "the agent's own report did not reach HQ through the other node"
    );

    // Into another site's tree: NATS acknowledges it and drops it; nobody reads it.
    let forged = "renkei/v1/131016/chiyoda-es/status";
    agent
        .client
        .publish(
            forged,
            QoS::AtLeastOnce,
            false,
            renkei_shared::encode(&status)?,
        )
        .await?;
    let integrator = MqttClient::connect_as(a, "dis", PASSWORD).await;
    integrator
        .client
        .publish(
            &own,
            QoS::AtLeastOnce,
            false,
            b"from an integrator".to_vec(),
        )
        .await?;
    ensure!(
        sato.publish_on(forged, Duration::from_secs(3))
            .await
            .is_none(),
        "an agent published into another site's tree"
    );
    ensure!(
        sato.publish_on(&own, Duration::from_secs(1))
            .await
            .is_none(),
        "an integrator published"
    );

    // A ward operator reads its own ward, not another's; an agent reads no one's tree.
    let mut tanaka = MqttClient::connect_as(b, "tanaka", PASSWORD).await;
    let codes = tanaka
        .subscribe_many_codes([
            "renkei/v1/131041/#".to_owned(),
            "renkei/v1/131016/#".to_owned(),
            "renkei/v1/hq/alert/#".to_owned(),
        ])
        .await;
    ensure!(
        matches!(
            codes.as_slice(),
            [
                SubscribeReasonCode::Success(_),
                SubscribeReasonCode::Failure,
                SubscribeReasonCode::Success(_)
            ]
        ),
        "a ward operator's subscriptions: {codes:?}"
    );
    let mut nosy = MqttClient::connect_as(a, "agent-chiyoda", PASSWORD).await;
    let codes = nosy.subscribe_codes("renkei/v1/131041/#").await;
    ensure!(
        matches!(codes.as_slice(), [SubscribeReasonCode::Failure]),
        "an agent read another ward: {codes:?}"
    );

    // A wrong password, or no login at all, is refused.
    let refused = renkei_testkit::mqtt::refusal(login_options(a, "x", "sato", "wrong")).await;
    ensure!(
        matches!(refused, Some(ConnectReturnCode::NotAuthorized)),
        "{refused:?}"
    );
    let anonymous = renkei_testkit::mqtt::refusal(renkei_testkit::mqtt::options(a, "y")).await;
    ensure!(anonymous.is_some(), "an anonymous client got in");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_the_surviving_nodes_keep_working_when_a_node_is_killed() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some(mut cluster) = cluster()? else {
        return Ok(());
    };
    let (a, b) = (cluster.nodes[0].mqtt(), cluster.nodes[1].mqtt());
    cluster.kill9(2);
    let killed = Instant::now();
    // An HQ dashboard on one surviving node, an agent on the other. The engine moves the
    // leaders of its replicated streams off the dead node meanwhile; until it has, a node may
    // stall or refuse a connection or a QoS 1 publish, and the clients connect again. The
    // dashboard connects as the page does: a fresh client id each time, subscribing at QoS 0.
    // What became of each round, for the report: where the time goes.
    let rounds = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let note = |rounds: &std::sync::Mutex<Vec<String>>, what: String| {
        if let Ok(mut rounds) = rounds.lock() {
            rounds.push(format!("{what} at {:.1} s", killed.elapsed().as_secs_f64()));
        }
    };
    let mut round = 0u64;
    let back = eventually_within(Duration::from_secs(90), "MQTT across the survivors", || {
        round += 1;
        let seq = round;
        let rounds = rounds.clone();
        async move {
            let dash = format!("sato-dash-{seq}");
            let sato = MqttClient::try_connect(login_options(b, &dash, "sato", PASSWORD)).await;
            let Ok(mut sato) = sato.map_err(|e| note(&rounds, format!("{seq}: dashboard {e}")))
            else {
                return None;
            };
            let codes = sato
                .subscribe_codes_at("renkei/v1/131041/#", QoS::AtMostOnce)
                .await;
            note(&rounds, format!("{seq}: dashboard subscribed {codes:?}"));
            if codes
                .iter()
                .any(|c| matches!(c, SubscribeReasonCode::Failure))
            {
                return None;
            }
            let agent =
                MqttClient::try_connect(login_options(a, "agent-nishi", "agent-nishi", PASSWORD))
                    .await;
            let Ok(agent) = agent.map_err(|e| note(&rounds, format!("{seq}: agent {e}"))) else {
                return None;
            };
            let mut status = renkei_shared::sample::status();
            status.header.seq = 1000 + seq;
            let topic = renkei_shared::Topic::of(&status).ok()?.to_string();
            // NATS may close either connection meanwhile: then this round ends.
            let sent = agent.try_send(&status).await;
            note(&rounds, format!("{seq}: agent connected, sent {sent}"));
            sent.then_some(())?;
            let want = renkei_shared::encode(&status).ok()?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
            while let Some(p) = sato.publish_within(left()).await {
                if p.topic == topic && *p.payload == *want {
                    return Some(killed.elapsed());
                }
            }
            None
        }
    })
    .await
    .with_context(|| cluster.nodes[0].log())?;
    cluster.restart(2);
    let rejoined = killed.elapsed();
    let rounds = rounds.lock().map(|r| r.join("; ")).unwrap_or_default();
    eprintln!(
        "one node of three killed: messages flowed between the survivors again {back:?} after; \
         the node restarted and was healthy {rejoined:?} after the kill; rounds: {rounds}"
    );
    Ok(())
}

/// A `renkei-broker` in external mode on the cluster, reading its stream, logged in as the
/// kit's admin, connected to the first node and knowing the others.
fn instance(cluster: &NatsCluster, dir: TempDir, id: &str) -> Result<BrokerProcess> {
    instance_recording_in(cluster, dir, id, None)
}

/// [`instance`], its record in the PostgreSQL database `postgres` names when given.
fn instance_recording_in(
    cluster: &NatsCluster,
    dir: TempDir,
    id: &str,
    postgres: Option<&str>,
) -> Result<BrokerProcess> {
    let password = dir.path().join("cluster.password");
    std::fs::write(&password, format!("{PASSWORD}\n"))?;
    let password = password.to_str().context("utf-8 path")?.to_owned();
    let mut args = cluster.instance_flags(0);
    args.extend([
        "--external-user".into(),
        "root".into(),
        "--external-password-file".into(),
        password,
        "--external-client-id".into(),
        id.into(),
    ]);
    if let Some(conninfo) = postgres {
        args.push("--postgres".into());
        args.push(conninfo.into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Ok(BrokerProcess::start_in(dir, &args))
}

/// The `(boot, seq)` of the sample site's messages in the record in `data_dir`, each once.
fn recorded(data_dir: &Path) -> Result<Vec<(i64, i64)>> {
    let conn = renkei_tests::open_record(data_dir)?;
    let mut stmt =
        conn.prepare("SELECT boot, seq FROM messages WHERE site = 'nishi-shinjuku-es'")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_records_from_the_replicated_stream_and_receipts_after_the_commit() -> Result<()>
{
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((mut cluster, dir)) = cluster_with_users()? else {
        return Ok(());
    };
    let broker = instance(&cluster, dir, "renkei-hq-1")?;
    let data = broker.data_dir();

    // An agent on the third node: its reports are recorded from the stream, and receipted.
    let site = renkei_shared::sample::site();
    let receipts = renkei_shared::receipt_topic(&site);
    let mut agent = MqttClient::connect_as(cluster.nodes[2].mqtt(), "agent-nishi", PASSWORD).await;
    agent.subscribe(&receipts).await;
    let mut sent = Vec::new();
    for env in [
        renkei_shared::sample::status(),
        renkei_shared::sample::shelter(),
        renkei_shared::sample::supplies(),
    ] {
        sent.push((i64::from(env.header.boot), env.header.seq as i64));
        agent.send(&env).await;
    }
    let last = renkei_shared::sample::supplies().header;
    let deadline = Instant::now() + Duration::from_secs(30);
    let receipt = loop {
        ensure!(
            Instant::now() < deadline,
            "no receipt for the reports:\n{}",
            broker.log()
        );
        let Some(payload) = agent.publish_on(&receipts, Duration::from_secs(1)).await else {
            continue;
        };
        if let Ok(receipt) = renkei_shared::Receipt::decode(&payload)
            && receipt.covers(last.boot, last.seq)
        {
            break receipt;
        }
    };
    let at_receipt = recorded(&data)?;
    for key in &sent {
        ensure!(
            at_receipt.contains(key),
            "receipted before it was recorded: {key:?} not in {at_receipt:?} ({receipt:?})"
        );
    }

    // The node the instance publishes through dies: its MQTT session moves to the next node
    // it knows, its stream reader to another server. The agent sends each report until it is
    // receipted (as `renkei-agent` does), from whichever node answers; every report is
    // recorded, once.
    cluster.kill9(0);
    let nodes = [cluster.nodes[1].mqtt(), cluster.nodes[2].mqtt()];
    let started = Instant::now();
    for n in 0..10u64 {
        let mut status = renkei_shared::sample::status();
        status.header.seq = 100 + n;
        let key = (i64::from(status.header.boot), status.header.seq as i64);
        sent.push(key);
        eventually_within(Duration::from_secs(90), "the report receipted", || {
            let status = status.clone();
            let receipts = receipts.clone();
            async move {
                let node = nodes[usize::try_from(n).unwrap_or(0) % 2];
                let mut agent = MqttClient::try_connect(login_options(
                    node,
                    "agent-131041-nishi-shinjuku-es",
                    "agent-nishi",
                    PASSWORD,
                ))
                .await
                .ok()?;
                let codes = agent.subscribe_codes(&receipts).await;
                if codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    return None;
                }
                agent.try_send(&status).await.then_some(())?;
                // NATS may close the connection meanwhile (a stalled QoS 1 stream): then this
                // round ends, and the report is sent again, as an agent does.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
                while let Some(p) = agent.publish_within(left()).await {
                    if p.topic == receipts
                        && renkei_shared::Receipt::decode(&p.payload)
                            .is_ok_and(|r| r.covers(status.header.boot, status.header.seq))
                    {
                        return Some(());
                    }
                }
                None
            }
        })
        .await
        .with_context(|| broker.log())?;
    }
    let through_kill = started.elapsed();
    let rows = recorded(&data)?;
    let mut unique = rows.clone();
    unique.sort_unstable();
    unique.dedup();
    ensure!(
        unique.len() == rows.len(),
        "a report recorded twice: {rows:?}"
    );
    for key in &sent {
        ensure!(rows.contains(key), "receipted but not recorded: {key:?}");
    }
    eprintln!(
        "JetStream ingest: {} reports recorded once each, receipted after the commit; 10 sent \
         one by one across a node kill in {through_kill:?}",
        sent.len()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rules_run_on_one_instance_and_move_within_ten_seconds_when_it_dies() -> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((cluster, dir)) = cluster_with_users()? else {
        return Ok(());
    };
    // The second instance's own directory, with the same users.
    let (other_dir, _) = authorization()?;
    let a = instance(&cluster, dir, "renkei-hq-a")?;
    let b = instance(&cluster, other_dir, "renkei-hq-b")?;
    let leader = |text: &str| metric(text, "renkei_rules_leader");
    let (first, second) = eventually_within(Duration::from_secs(30), "one leader", || async {
        let (ta, tb) = (
            scrape(a.addrs.http, ROOT).await,
            scrape(b.addrs.http, ROOT).await,
        );
        match (leader(&ta), leader(&tb)) {
            (Some(1), Some(0)) => Some(("a", "b")),
            (Some(0), Some(1)) => Some(("b", "a")),
            _ => None,
        }
    })
    .await?;
    // Both stay as they are: one leader, not two.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (ta, tb) = (
        scrape(a.addrs.http, ROOT).await,
        scrape(b.addrs.http, ROOT).await,
    );
    ensure!(
        leader(&ta).unwrap_or(0) + leader(&tb).unwrap_or(0) == 1,
        "two leaders, or none:\n{ta}\n{tb}"
    );
    let (dead, survivor) = if first == "a" { (a, b) } else { (b, a) };
    let _dir = dead.kill9_keeping_dir();
    let killed = Instant::now();
    let took_over = eventually_within(Duration::from_secs(10), "the rules moved", || async {
        let text = scrape(survivor.addrs.http, ROOT).await;
        (leader(&text) == Some(1)).then(|| killed.elapsed())
    })
    .await
    .with_context(|| survivor.log())?;
    eprintln!("rules: {first} led; killed, {second} took over {took_over:?} after");
    Ok(())
}

/// A client that connects again whenever the engine closes its connection, as an agent's
/// does (NATS closes connections whose QoS 1 work stalls while its streams elect leaders).
/// `filter`, if given, is subscribed on every connection (the session is clean); whether the
/// last subscription was granted is the flag returned; what arrives goes to `on_publish`.
fn reconnecting(
    options: rumqttc::MqttOptions,
    filter: Option<&'static str>,
    on_publish: impl Fn(&rumqttc::Publish) + Send + 'static,
) -> (
    rumqttc::AsyncClient,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    tokio::task::JoinHandle<()>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 1_000);
    let subscribed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (subscriber, flag) = (client.clone(), subscribed.clone());
    let task = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                    flag.store(false, Relaxed);
                    if let Some(filter) = filter {
                        let _ = subscriber.try_subscribe(filter, QoS::AtLeastOnce);
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(ack))) => {
                    let granted = !ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, SubscribeReasonCode::Failure));
                    flag.store(granted, Relaxed);
                    if !granted && let Some(filter) = filter {
                        // Refused while the engine elects leaders: ask again.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let _ = subscriber.try_subscribe(filter, QoS::AtLeastOnce);
                    }
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => on_publish(&p),
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
            }
        }
    });
    (client, subscribed, task)
}

/// Sites of the load, all in Shinjuku: `load-000` to `load-{LOAD_SITES - 1}`.
const LOAD_SITES: u64 = 200;

/// The load's message `n` (0-based): site `n % LOAD_SITES`, its sequence number `n / LOAD_SITES`.
fn load_message(n: u64) -> renkei_shared::Envelope {
    let mut env = renkei_shared::sample::status();
    let site = renkei_shared::SiteRef {
        ward: renkei_shared::WardCode(131041),
        site: renkei_shared::Id::new(format!("load-{:03}", n % LOAD_SITES)).unwrap(),
    };
    env.header.origin = renkei_shared::Origin::Site(site);
    env.header.boot = 1;
    env.header.seq = n / LOAD_SITES + 1;
    env.header.sent_at = renkei_shared::Timestamp(env.header.sent_at.0 + (n / LOAD_SITES) as i64);
    env
}

/// Every `(site, seq)` some receipt has named, as the sites' agents would keep them.
#[derive(Default)]
struct Receipted(
    std::sync::Mutex<std::collections::HashMap<String, Vec<renkei_shared::receipt::SeqRange>>>,
);

impl Receipted {
    fn add(&self, topic: &str, payload: &[u8]) {
        let (Some(site), Ok(receipt)) = (
            renkei_shared::receipt::parse_receipt_topic(topic),
            renkei_shared::Receipt::decode(payload),
        ) else {
            return;
        };
        let mut map = self.0.lock().unwrap();
        map.entry(site.site.to_string())
            .or_default()
            .extend(receipt.recorded);
    }

    fn covers(&self, n: u64) -> bool {
        let env = load_message(n);
        let renkei_shared::Origin::Site(site) = &env.header.origin else {
            return false;
        };
        let map = self.0.lock().unwrap();
        map.get(site.site.as_str()).is_some_and(|ranges| {
            ranges
                .iter()
                .any(|r| r.boot == 1 && r.first <= env.header.seq && env.header.seq <= r.last)
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_one_postgresql_record_through_a_node_kill_a_database_restart_and_an_instance_kill()
-> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    let Some((mut cluster, dir)) = cluster_with_users()? else {
        return Ok(());
    };
    let mut pg = renkei_testkit::postgres::Postgres::start();
    let (other_dir, _) = authorization()?;
    let a = instance_recording_in(&cluster, dir, "renkei-hq-a", Some(&pg.url()))?;
    let b = instance_recording_in(&cluster, other_dir, "renkei-hq-b", Some(&pg.url()))?;

    // The load and the receipts go through the third node, which stays up; the sites'
    // messages are sent by one client under the admin login, as many agents would.
    let node = cluster.nodes[2].mqtt();
    let receipted = std::sync::Arc::new(Receipted::default());
    let (_listener, subscribed, listening) = {
        let receipted = receipted.clone();
        reconnecting(
            login_options(node, "load-receipts", "root", PASSWORD),
            Some("renkei/receipt/v1/131041/+"),
            move |p| receipted.add(&p.topic, &p.payload),
        )
    };
    eventually_within(Duration::from_secs(30), "the receipts subscribed", || {
        let subscribed = subscribed.clone();
        async move {
            subscribed
                .load(std::sync::atomic::Ordering::Relaxed)
                .then_some(())
        }
    })
    .await?;
    // NATS takes a connection's QoS 1 publishes one at a time (each waits for its stream's
    // acknowledgement), so the sites' messages come through SENDERS connections, as many
    // agents' would.
    const SENDERS: u64 = 20;
    let mut senders = Vec::new();
    for k in 0..SENDERS {
        let options = login_options(node, &format!("load-sender-{k}"), "root", PASSWORD);
        senders.push(reconnecting(options, None, |_| {}).0);
    }

    // ~2,000 messages a second for 30 s, each sender pacing its share in steps of 10 ms; the
    // faults at set times meanwhile.
    const RATE: u64 = 2_000;
    const SECONDS: u64 = 30;
    let total = RATE * SECONDS;
    let started = Instant::now();
    let sent = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut sending = Vec::new();
    for (k, sender) in senders.iter().enumerate() {
        let (sender, sent) = (sender.clone(), sent.clone());
        let k = k as u64;
        sending.push(tokio::spawn(async move {
            // This sender's messages: k, k + SENDERS, k + 2 SENDERS, …
            let mine = (total - k).div_ceil(SENDERS);
            let mut i = 0;
            while i < mine {
                let due = (started.elapsed().as_millis() as u64 * RATE / 1000 / SENDERS).min(mine);
                while i < due {
                    send_on(&sender, &load_message(k + i * SENDERS)).await;
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    i += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    let mut faults = vec![
        (Duration::from_secs(6), "kill -9 NATS node 0"),
        (Duration::from_secs(14), "PostgreSQL crash"),
        (Duration::from_secs(18), "PostgreSQL back"),
        (Duration::from_secs(22), "kill -9 instance a"),
    ];
    faults.reverse();
    let mut a = Some(a);
    let mut dead_a = None;
    let mut fault_log = Vec::new();
    while let Some((at, what)) = faults.pop() {
        tokio::time::sleep(at.saturating_sub(started.elapsed())).await;
        match what {
            "kill -9 NATS node 0" => cluster.kill9(0),
            "PostgreSQL crash" => pg.crash(),
            "PostgreSQL back" => pg.start_again(),
            _ => dead_a = a.take().map(BrokerProcess::kill9_keeping_dir),
        }
        let so_far = sent.load(std::sync::atomic::Ordering::Relaxed);
        fault_log.push(format!("{what} at {:?} ({so_far} sent)", started.elapsed()));
    }
    for task in sending {
        task.await?;
    }
    let load_took = started.elapsed();
    ensure!(
        a.is_none() && dead_a.is_some(),
        "every fault ran: {fault_log:?}"
    );
    // As the sites' agents do: whatever has no receipt once receipts stop coming is sent
    // again, until every message has one.
    let mut resent = 0u64;
    let drain = Instant::now();
    let mut before = usize::MAX;
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let missing: Vec<u64> = (0..total).filter(|n| !receipted.covers(*n)).collect();
        if missing.is_empty() {
            break;
        }
        ensure!(
            drain.elapsed() < Duration::from_secs(240),
            "{} of {total} never receipted (first {:?}); {} rows recorded; faults \
             {fault_log:?}\n{}",
            missing.len(),
            &missing[..missing.len().min(5)],
            pg.count("SELECT COUNT(*) FROM messages WHERE site LIKE 'load-%'"),
            b.log()
        );
        if missing.len() < before {
            // Still catching up.
            before = missing.len();
            continue;
        }
        before = missing.len();
        for n in &missing {
            send_on(&senders[(*n % SENDERS) as usize], &load_message(*n)).await;
        }
        resent += missing.len() as u64;
    }
    let receipted_all = drain.elapsed();
    listening.abort();

    // One record: every message once, whichever instance wrote it.
    let rows = pg.count("SELECT COUNT(*) FROM messages WHERE site LIKE 'load-%'");
    let keys = pg.count(
        "SELECT COUNT(DISTINCT (origin_id, boot, seq)) FROM messages WHERE site LIKE 'load-%'",
    );
    ensure!(
        rows == total as i64 && keys == rows,
        "{rows} rows, {keys} keys for {total} messages"
    );
    // The survivor serves the whole state from it.
    let state = renkei_testkit::http_get_as(b.addrs.http, "/api/v1/state", ROOT).await;
    let body = String::from_utf8_lossy(&state.body);
    let load_sites = body.matches("\"load-").count();
    ensure!(
        load_sites as u64 >= LOAD_SITES,
        "the survivor's state lacks load sites ({load_sites})"
    );
    eprintln!(
        "two instances on one PostgreSQL record: {total} messages at {:.0} msg/s over {load_took:?}; \
         {fault_log:?}; {resent} sent again for want of a receipt; all receipted {receipted_all:?} \
         after the load; {rows} rows, one per message",
        total as f64 / load_took.as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dashboard_on_the_cluster_shows_live_data_again_soon_after_its_node_is_killed()
-> Result<()> {
    let _one = ONE_AT_A_TIME.lock().await;
    if !NatsCluster::installed() {
        eprintln!("SKIPPED: nats-server is not installed (apt-get install nats-server)");
        return Ok(());
    }
    // Open, as the demo's: the login is the embedded tests' business; this is the failover.
    let mut cluster = NatsCluster::start("");
    let dir = renkei_testkit::prepare();
    renkei_testkit::write_config(dir.path(), &cluster.dashboard_config(0));
    // The instance serves the page and its /config.json, and has its session through node 1:
    // only the dashboard's own node dies.
    let mut args = cluster.instance_flags(1);
    args.extend([
        "--demo".into(),
        "--external-client-id".into(),
        "renkei-hq-dash".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let broker = BrokerProcess::start_serving(&renkei_tests::built_dashboard()?, dir, &args);
    let browser = renkei_tests::Browser::start().await?;
    browser
        .client
        .goto(&format!("http://{}/", broker.addrs.http))
        .await?;

    // A shelter reports through node 2 every second, as an agent does: its client connects
    // again whenever NATS closes the connection (it does while its streams elect leaders).
    // The page shows it through node 0.
    let tile = ".tile[data-ward=\"131041\"] [data-field=\"evacuees\"]";
    let (client, mut eventloop) = rumqttc::AsyncClient::new(
        renkei_testkit::options(cluster.nodes[2].mqtt(), "dash-agent"),
        100,
    );
    let driving = tokio::spawn(async move {
        loop {
            if eventloop.poll().await.is_err() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let evacuees = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(312));
    let reporting = {
        let evacuees = evacuees.clone();
        tokio::spawn(async move {
            for seq in 1000.. {
                let mut env = renkei_shared::sample::shelter();
                env.header.seq = seq;
                env.header.sent_at = renkei_shared::Timestamp::now();
                if let renkei_shared::Body::Shelter(s) = &mut env.body {
                    s.evacuees = Some(evacuees.load(std::sync::atomic::Ordering::Relaxed));
                }
                let topic = renkei_shared::Topic::of(&env).unwrap().to_string();
                let payload = renkei_shared::encode(&env).unwrap();
                let _ = client.publish(topic, QoS::AtLeastOnce, true, payload).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    browser
        .wait_for_text(tile, "312 / 450", Duration::from_secs(60))
        .await
        .with_context(|| broker.log())?;

    cluster.kill9(0);
    let killed = Instant::now();
    evacuees.store(77, std::sync::atomic::Ordering::Relaxed);
    let shown = browser
        .wait_for_text(tile, "77 / 450", Duration::from_secs(90))
        .await;
    let took = killed.elapsed();
    reporting.abort();
    driving.abort();
    shown.with_context(|| format!("nothing new on the page {took:?} after its node died"))?;
    eprintln!(
        "dashboard on the cluster: its node killed, live data on the page again {took:?} after"
    );
    Ok(())
}
