import Foundation
import GRPCCore
import StockpotModel
import StockpotProto
import StockpotRegistry
import StockpotServing
import Synchronization
import Testing

@Suite struct RegistrySafety {
    @Test(arguments: [".", "..", ".incoming", "-x", "_x"])
    func folderLikeNamesAreRefused(name: String) async throws {
        let root = temporaryDirectory("registry-names")
        defer { try? FileManager.default.removeItem(at: root) }
        let service = RegistryService(store: try await RegistryStore.open(root: root))
        let handlers = RegistryHandlers()
        let a: [UInt8] = Array("model".utf8)
        #expect(await expectStatus(.invalidArgument, mentioning: "header.name") {
            try await handlers.upload(service, [handlers.header([("model.json", a)], name: name), handlers.chunk("model.json", a)])
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "name") {
            try await withContext { try await service.setAlias(request: .with { $0.name = name; $0.alias = "production"; $0.version = 1 }, context: $0) }
        })
        #expect(await expectStatus(.invalidArgument, mentioning: "alias") {
            try await withContext { try await service.setAlias(request: .with { $0.name = "m"; $0.alias = name; $0.version = 1 }, context: $0) }
        })
        if case .success = ModelReference.parse("\(name)@production") { Issue.record("'\(name)@production' parsed") }
        // Nothing was written next to the artifact folders.
        let entries = try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("artifacts").path)
        #expect(Set(entries) == [".incoming", ".store-id"])
    }

    @Test func aPublishedFolderIsNeverMissing() async throws {
        // A reader polls a file inside the folder while it is replaced 200 times: it always finds one of the
        // complete versions, never nothing, and no staging folder is left behind.
        let root = temporaryDirectory("publish")
        defer { try? FileManager.default.removeItem(at: root) }
        let target = root.appendingPathComponent("m/1")
        func stage(_ n: Int) throws -> URL {
            let dir = root.appendingPathComponent(".download-\(n)")
            try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
            try Data("v\(n)".utf8).write(to: dir.appendingPathComponent("model.json"))
            return dir
        }
        try AtomicFile.publishDirectory(try stage(0), at: target)
        let stop = Locked(false), misses = Locked(0), reads = Locked(0)
        let reader = Thread {
            while !stop.value {
                if let d = try? Data(contentsOf: target.appendingPathComponent("model.json")), d.first == UInt8(ascii: "v") {
                    reads { $0 += 1 }
                } else {
                    misses { $0 += 1 }
                }
            }
        }
        reader.start()
        for n in 1...200 { try AtomicFile.publishDirectory(try stage(n), at: target) }
        stop { $0 = true }
        try await Task.sleep(for: .milliseconds(20))
        #expect(misses.value == 0)
        #expect(reads.value > 0)
        #expect(try String(contentsOf: target.appendingPathComponent("model.json"), encoding: .utf8) == "v200")
        // Only the link, its content, the content it replaced (kept until the next publication) and the lock file.
        #expect(try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("m").path).count == 4)
        #expect(try FileManager.default.contentsOfDirectory(atPath: root.path).filter { $0.hasPrefix(".download") }.isEmpty)
    }

    @Test func aPlainFolderFromAnOlderCacheIsReplaced() throws {
        let root = temporaryDirectory("publish-legacy")
        defer { try? FileManager.default.removeItem(at: root) }
        let target = root.appendingPathComponent("m/1")
        try FileManager.default.createDirectory(at: target, withIntermediateDirectories: true)
        try Data("old".utf8).write(to: target.appendingPathComponent("model.json"))
        let staged = root.appendingPathComponent(".download-x")
        try FileManager.default.createDirectory(at: staged, withIntermediateDirectories: true)
        try Data("new".utf8).write(to: staged.appendingPathComponent("model.json"))
        // A leftover of a publisher that crashed half-way is swept too.
        try FileManager.default.createDirectory(at: root.appendingPathComponent("m/.1.crashed"), withIntermediateDirectories: true)
        try AtomicFile.publishDirectory(staged, at: target)
        #expect(try String(contentsOf: target.appendingPathComponent("model.json"), encoding: .utf8) == "new")
        let left = try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("m").path).sorted()
        #expect(left.count == 4 && left.contains("1") && left.contains(".1.lock") && !left.contains(".1.crashed"), "\(left)")
    }
}

@Suite struct ConcurrentPublishers {
    @Test func publishersOfOneFolderTakeTurns() async throws {
        let root = temporaryDirectory("publish-race")
        defer { try? FileManager.default.removeItem(at: root) }
        let target = root.appendingPathComponent("m/1")
        try await withThrowingTaskGroup(of: Void.self) { group in
            for n in 0..<16 {
                group.addTask {
                    let dir = root.appendingPathComponent(".download-\(n)")
                    try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
                    try Data("v\(n)".utf8).write(to: dir.appendingPathComponent("model.json"))
                    try AtomicFile.publishDirectory(dir, at: target)
                }
            }
            try await group.waitForAll()
        }
        let text = try String(contentsOf: target.appendingPathComponent("model.json"), encoding: .utf8)
        #expect(text.hasPrefix("v"))
        #expect(try FileManager.default.contentsOfDirectory(atPath: root.appendingPathComponent("m").path).count == 4)
    }
}
