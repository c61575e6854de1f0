import ArgumentParser
import Foundation
import StockpotModel
import Synchronization

/// Runs the Python peer benchmarks in `scripts/` (ONNX Runtime, PyTorch): one process each, one JSON line out.
enum PythonPeer {
    /// Runs `python3 script args…` with one-thread defaults for the math libraries and decodes its last line.
    static func run<Reply: Decodable>(_ script: String, _ args: [String], as: Reply.Type, install: String) throws -> Reply {
        guard FileManager.default.fileExists(atPath: script) else {
            throw ValidationError("\(script) not found (run from the project root, or pass the script's path)")
        }
        let p = Process()
        p.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        p.arguments = ["python3", script] + args
        var env = ProcessInfo.processInfo.environment
        env["OMP_NUM_THREADS"] = "1"
        p.environment = env
        let out = Pipe(), err = Pipe()
        p.standardOutput = out
        p.standardError = err
        try p.run()
        // Read stderr on another thread so a chatty peer cannot fill its pipe and stall.
        let errData = Mutex(Data())
        let done = DispatchGroup()
        DispatchQueue.global().async(group: done) {
            let d = err.fileHandleForReading.readDataToEndOfFile()
            errData.withLock { $0 = d }
        }
        let data = out.fileHandleForReading.readDataToEndOfFile()
        p.waitUntilExit()
        done.wait()
        guard p.terminationStatus == 0 else {
            let text = String(decoding: errData.withLock { $0 }, as: UTF8.self)
            throw ValidationError("\(script) exited with \(p.terminationStatus): \(text.suffix(600)) (\(install))")
        }
        guard let line = String(decoding: data, as: UTF8.self).split(separator: "\n").last else {
            throw ValidationError("\(script) printed nothing")
        }
        do {
            return try JSONDecoder().decode(Reply.self, from: Data(line.utf8))
        } catch {
            throw ValidationError("\(script) printed '\(line.prefix(300))', not the expected JSON: \(error)")
        }
    }

    /// Writes `values`' bytes (little-endian on every platform Stockpot runs on) to a new temporary file.
    static func temporaryFile<T>(_ values: [T], name: String) throws -> URL {
        let url = FileManager.default.temporaryDirectory.appendingPathComponent("stockpot-\(name)-\(UUID().uuidString).bin")
        try values.withUnsafeBytes { try Data($0).write(to: url) }
        return url
    }
}
