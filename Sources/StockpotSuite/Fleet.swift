import Foundation
import StockpotServing

/// Stockpot executables run as child processes, by name (`scorer-1` is a replica of `stockpot-scorer`), each
/// logging to `<logs>/<name>.log`: the multi-process benchmarks, the fault harness and the replica tests.
public final class Fleet: @unchecked Sendable {
    /// A child process that did not come up.
    public struct Failure: Error, CustomStringConvertible {
        public var description: String
    }

    /// The folder holding the `stockpot-*` executables: `given`, or this binary's folder.
    public static func binFolder(_ given: String?) -> URL {
        given.map { URL(fileURLWithPath: $0) }
            ?? URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath().deletingLastPathComponent()
    }

    private let bin: URL
    private let logs: URL
    private let log: @Sendable (String) -> Void
    private var processes: [String: (process: Process, arguments: [String], niceness: Int?, logLevel: String)] = [:]
    /// Where each process's lines start in its log (a restarted process appends).
    private var logStarts: [String: UInt64] = [:]
    private let lock = NSLock()

    /// - Parameter log: where "started …", "killed …" lines go.
    public init(bin: URL, logs: URL, log: @escaping @Sendable (String) -> Void = { FileHandle.standardError.write(Data(($0 + "\n").utf8)) }) {
        self.bin = bin
        self.logs = logs
        self.log = log
    }

    /// `features-a` and `scorer-1` are replicas of `stockpot-features` and `stockpot-scorer`.
    private func executable(_ name: String) -> String {
        "stockpot-" + (name.split(separator: "-").first.map(String.init) ?? name)
    }

    /// - Parameters:
    ///   - niceness: run it under `nice -n` (a lower CPU priority) when set.
    ///   - logLevel: its `--log-level` (`info` shows the metrics endpoint's port, for `metricsPort(of:)`).
    public func start(_ name: String, _ arguments: [String], niceness: Int? = nil, logLevel: String = "notice") throws {
        let p = Process()
        let path = bin.appendingPathComponent(executable(name))
        if let niceness {
            p.executableURL = URL(fileURLWithPath: "/usr/bin/nice")
            p.arguments = ["-n", "\(niceness)", path.path] + arguments + ["--log-level", logLevel]
        } else {
            p.executableURL = path
            p.arguments = arguments + ["--log-level", logLevel]
        }
        let logURL = logs.appendingPathComponent("\(name).log")
        if !FileManager.default.fileExists(atPath: logURL.path) { _ = FileManager.default.createFile(atPath: logURL.path, contents: nil) }
        let file = try FileHandle(forWritingTo: logURL)
        let offset = try file.seekToEnd()
        p.standardOutput = file
        p.standardError = file
        try p.run()
        lock.withLock {
            processes[name] = (p, arguments, niceness, logLevel)
            logStarts[name] = offset
        }
        log("started \(name) (pid \(p.processIdentifier))")
    }

    private func pid(_ name: String) -> Int32? { lock.withLock { processes[name]?.process.processIdentifier } }

    /// Where `name`'s output goes.
    public func logURL(_ name: String) -> URL { logs.appendingPathComponent("\(name).log") }

    /// The exit status of a process that has ended, or nil while it runs.
    public func exited(_ name: String) -> Int32? {
        guard let p = lock.withLock({ processes[name]?.process }), !p.isRunning else { return nil }
        return p.terminationStatus
    }

    /// Kills `name` with SIGKILL (no drain) and waits for it to end.
    public func kill(_ name: String) {
        guard let pid = pid(name) else { return }
        _ = Foundation.kill(pid, SIGKILL)
        lock.withLock { processes[name]?.process }?.waitUntilExit()
        log("killed \(name) (pid \(pid))")
    }

    /// Stops `name` with SIGSTOP: alive, answering nothing.
    public func pause(_ name: String) { if let pid = pid(name) { _ = Foundation.kill(pid, SIGSTOP); log("paused \(name)") } }
    /// Lets a paused `name` run again (SIGCONT).
    public func resume(_ name: String) { if let pid = pid(name) { _ = Foundation.kill(pid, SIGCONT); log("resumed \(name)") } }

    /// Starts `name` again with the arguments it was first started with.
    public func restart(_ name: String) throws {
        guard let (arguments, niceness, level) = lock.withLock({ processes[name].map { ($0.arguments, $0.niceness, $0.logLevel) } }) else { return }
        try start(name, arguments, niceness: niceness, logLevel: level)
    }

    /// The port `name` listens on (its "listening on port N" line; for processes started with `--port 0`).
    public func port(of name: String, timeout: Duration = .seconds(120)) async throws -> Int {
        try await logValue(name, timeout: timeout) { line in
            guard let r = line.range(of: " listening on port ") else { return nil }
            return Int(line[r.upperBound...].prefix { $0.isNumber })
        }
    }

    /// The port of `name`'s metrics endpoint (started with `--metrics-port 0` and `logLevel: "info"`).
    public func metricsPort(of name: String, timeout: Duration = .seconds(120)) async throws -> Int {
        try await logValue(name, timeout: timeout) { line in
            guard line.contains("metrics endpoint listening"), let r = line.range(of: "port=") else { return nil }
            return Int(line[r.upperBound...].prefix { $0.isNumber })
        }
    }

    /// The first value `parse` reads from a line of `name`'s log (this run's lines), polled until `timeout`.
    private func logValue(_ name: String, timeout: Duration, _ parse: (Substring) -> Int?) async throws -> Int {
        let until = ContinuousClock.now + timeout
        while true {
            let start = Int(lock.withLock { logStarts[name] } ?? 0)
            let data = (try? Data(contentsOf: logURL(name))) ?? Data()
            let text = String(decoding: data.count > start ? data[start...] : Data(), as: UTF8.self)
            for line in text.split(separator: "\n") {
                if let v = parse(line) { return v }
            }
            if let exit = exited(name) { throw Failure(description: "\(name) exited (\(exit)); see \(logURL(name).path)") }
            guard ContinuousClock.now < until else { throw Failure(description: "\(name): nothing in its log after \(timeout); see \(logURL(name).path)") }
            try await Task.sleep(for: .milliseconds(100))
        }
    }

    /// Waits until `name` at `target` reports SERVING; fails at once if the process exits first.
    public func waitServing(_ name: String, at target: String, timeout: Duration = .seconds(180)) async throws {
        let until = ContinuousClock.now + timeout
        guard lock.withLock({ processes[name] }) != nil else { throw Failure(description: "no process named \(name)") }
        while !(await HealthProbe.isServing(target: target)) || exited(name) != nil {
            if let exit = exited(name) {
                throw Failure(description: "\(name) exited (\(exit)) before SERVING; see \(logURL(name).path)")
            }
            guard ContinuousClock.now < until else { throw Failure(description: "\(name) at \(target) not SERVING after \(timeout)") }
            try await Task.sleep(for: .milliseconds(200))
        }
    }

    /// Terminates every process (SIGTERM: a graceful drain) and waits for them.
    public func stopAll() {
        let all = lock.withLock { processes.values.map(\.process) }
        for p in all where p.isRunning {
            _ = Foundation.kill(p.processIdentifier, SIGCONT)
            p.terminate()
        }
        for p in all { p.waitUntilExit() }
    }
}
