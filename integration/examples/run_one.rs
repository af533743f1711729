//! Runs one switcher scenario and prints the judgement (development aid).
use integration::qemu::QemuConfig;
use integration::scenario::{run, Scenario};
use vmm_switcher::SwitcherKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let kind = args
        .get(1)
        .and_then(|n| SwitcherKind::from_cli_name(n))
        .unwrap_or(SwitcherKind::Legacy32ToAmd64);
    let trips = args.get(2).and_then(|n| n.parse().ok()).unwrap_or(4);
    let mut s = Scenario::new(kind);
    s.trips = trips;
    s.options.trace = args.iter().any(|a| a == "trace");
    if args.iter().any(|a| a == "x2") {
        s.host_x2apic = true;
        s.options.x2apic = true;
    }
    let mut q = QemuConfig::default();
    if args.iter().any(|a| a == "x2") {
        q.cpu = Some("qemu64,+x2apic".into());
    }
    if args.iter().any(|a| a == "log") {
        q.debug_log = Some("/tmp/ctx/qemu.log".into());
    }
    let r = run(&s, &q)?;
    println!(
        "outcome={} verified={} trips={} to_gc={:?} to_hc={:?} per_trip={:?} last_step={:?}",
        r.outcome,
        r.verified,
        r.round_trips,
        r.instructions_to_guest,
        r.instructions_to_host,
        r.instructions_per_round_trip,
        r.last_step
    );
    for f in &r.failures {
        println!("  fail: {f}");
    }
    println!("mailbox: {:?}", r.mailbox);
    let serial = String::from_utf8_lossy(&r.run.serial);
    for l in serial.lines().take(40) {
        println!("| {}", l.chars().take(200).collect::<String>());
    }
    Ok(())
}
