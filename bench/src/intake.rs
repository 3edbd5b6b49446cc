//! `postern-bench intake`: the edge front end's memory figures, measured on the real binary.
//!
//! Starts `postern run` as a child on a temporary configuration (loopback, port 0, a spool
//! in a temporary directory), then acts as the client:
//!
//! 1. streams one message of `--size` octets (default 1 GiB) through SMTP DATA and waits for
//!    the 250 (the message is then durable in the spool), and reports the throughput and the
//!    child's peak RSS (`VmHWM`);
//! 2. opens `--idle` connections (default 10,000) that each read the greeting and then sit
//!    idle, and reports the child's RSS with all of them open, and per connection.
//!
//! Figures are printed; nothing is asserted (the targets are in the issue and the README).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What to measure.
#[derive(Clone, Debug)]
pub struct IntakeArgs {
    /// Octets in the big message.
    pub size: u64,
    /// Idle connections to hold.
    pub idle: usize,
    /// The `postern` binary that runs the gateway.
    pub postern: std::path::PathBuf,
}

/// Runs the benchmark and prints the figures.
pub fn run(args: &IntakeArgs) -> Result<(), String> {
    postern::gateway::raise_fd_limit(args.idle as u64 + 1024);
    let dir = tempfile_dir()?;
    let config = format!(
        "hostname: bench.test\nnode_id: 9\nspool:\n  path: {}\n  min_free: 0\nmetrics:\n  address: 127.0.0.1:0\nlisteners:\n  - name: smtp\n    address: 127.0.0.1:0\n    protocol: smtp\n    max_connections: {}\n    max_connections_per_ip: {}\n    max_message_size: {}\nstores:\n  - name: local\n    kind: maildir\n    root: {}\nroutes:\n  domains:\n    example.org: {{ store: local }}\n",
        dir.join("spool").display(),
        args.idle + 100,
        args.idle + 100,
        args.size + (1 << 20),
        dir.join("mail").display(),
    );
    let config_path = dir.join("bench.yaml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let (mut child, addr) = spawn(&args.postern, &config_path)?;
    let pid = child.id();
    let result = (|| {
        println!("postern-bench intake (pid {pid}, {addr})");
        println!("baseline RSS: {}", mib(status_kib(pid, "VmRSS:")?));
        big_message(&addr, args.size, pid)?;
        idle_connections(&addr, args.idle, pid)
    })();
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let base = std::env::temp_dir().join(format!("postern-bench-{}", std::process::id()));
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    Ok(base)
}

fn spawn(postern: &Path, config: &Path) -> Result<(Child, String), String> {
    let mut child = Command::new(postern)
        .args(["--log-format", "json", "run", "--config"])
        .arg(config)
        .env("POSTERN_LOG", "warn,postern::listener=info")
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    let addr = loop {
        let line = lines
            .next()
            .ok_or("postern exited before listening")?
            .map_err(|e| e.to_string())?;
        if line.contains("\"listening\"") {
            if let Some(a) = json_field(&line, "address") {
                break a;
            }
        }
    };
    std::thread::spawn(move || for _ in lines.by_ref() {});
    Ok((child, addr))
}

fn json_field(line: &str, name: &str) -> Option<String> {
    let key = format!("\"{name}\":\"");
    let start = line.find(&key)? + key.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_owned())
}

/// A value in KiB from /proc/PID/status.
fn status_kib(pid: u32, key: &str) -> Result<u64, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key} in /proc/{pid}/status"))
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn read_reply(r: &mut BufReader<TcpStream>) -> Result<String, String> {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
            return Err(format!("connection closed after {all:?}"));
        }
        all.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok(all);
        }
    }
}

fn command(r: &mut BufReader<TcpStream>, line: &str, code: &str) -> Result<(), String> {
    r.get_mut()
        .write_all(format!("{line}\r\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let reply = read_reply(r)?;
    if reply.starts_with(code) {
        Ok(())
    } else {
        Err(format!("{line}: {reply}"))
    }
}

fn big_message(addr: &str, size: u64, pid: u32) -> Result<(), String> {
    let stream = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let mut r = BufReader::new(stream);
    read_reply(&mut r)?;
    command(&mut r, "EHLO bench.client", "250")?;
    command(&mut r, "MAIL FROM:<bench@example.org>", "250")?;
    command(&mut r, "RCPT TO:<big@example.org>", "250")?;
    command(&mut r, "DATA", "354")?;
    let mut line = [b'x'; 78];
    line[76] = b'\r';
    line[77] = b'\n';
    let block: Vec<u8> = line.iter().copied().cycle().take(78 * 840).collect();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut peak_during = 0u64;
    r.get_mut()
        .write_all(b"Subject: big\r\n\r\n")
        .map_err(|e| e.to_string())?;
    while sent < size {
        let n = (size - sent).min(block.len() as u64) as usize;
        let n = n - n % 78;
        let n = if n == 0 { 78 } else { n };
        r.get_mut()
            .write_all(&block[..n])
            .map_err(|e| e.to_string())?;
        sent += n as u64;
        if sent % (64 << 20) < n as u64 {
            peak_during = peak_during.max(status_kib(pid, "VmRSS:")?);
        }
    }
    r.get_mut().write_all(b".\r\n").map_err(|e| e.to_string())?;
    let reply = read_reply(&mut r)?;
    let elapsed = started.elapsed();
    if !reply.starts_with("250") {
        return Err(format!("end of data: {reply}"));
    }
    let hwm = status_kib(pid, "VmHWM:")?;
    println!(
        "big message: {} octets in {:.2} s = {:.0} MiB/s, reply {:?}",
        sent,
        elapsed.as_secs_f64(),
        sent as f64 / (1 << 20) as f64 / elapsed.as_secs_f64(),
        reply.trim_end()
    );
    println!(
        "big message: peak RSS of postern (VmHWM) {} (RSS sampled while streaming: {})",
        mib(hwm),
        mib(peak_during)
    );
    let _ = command(&mut r, "QUIT", "221");
    Ok(())
}

fn idle_connections(addr: &str, n: usize, pid: u32) -> Result<(), String> {
    let before = status_kib(pid, "VmRSS:")?;
    let started = Instant::now();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let stream = TcpStream::connect(addr).map_err(|e| format!("connection {i}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        held.push(stream);
    }
    // Every session has started once its greeting arrived.
    let mut greeting = [0u8; 64];
    for (i, s) in held.iter_mut().enumerate() {
        let k = s
            .read(&mut greeting)
            .map_err(|e| format!("greeting {i}: {e}"))?;
        if !greeting[..k].starts_with(b"220") {
            return Err(format!(
                "connection {i}: {:?}",
                String::from_utf8_lossy(&greeting[..k])
            ));
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    let after = status_kib(pid, "VmRSS:")?;
    println!(
        "idle connections: {n} open in {:.2} s; postern RSS {} (was {}), {:.1} KiB per connection",
        started.elapsed().as_secs_f64(),
        mib(after),
        mib(before),
        (after.saturating_sub(before)) as f64 / n.max(1) as f64
    );
    Ok(())
}
