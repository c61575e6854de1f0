import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotModel
import StockpotProto
import StockpotRegistry
import StockpotServing
import StockpotTraining
import SwiftProtobuf

/// `stockpot registry …`: the release loop from the command line (each command is one registry RPC).
struct RegistryCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "registry",
        abstract: "Register, inspect, promote and roll back model versions; read the alias history.",
        discussion: """
        Reads are open. Writes send a bearer token: STOCKPOT_REGISTRY_TOKEN, else --token-file (or \
        STOCKPOT_REGISTRY_TOKEN_FILE), else data/admin.token (created by `stockpot suite` on its first run). \
        Times are shown in your zone and UTC, and accepted in your zone unless they name one (Z, +02:00, UTC).
        """,
        subcommands: [List.self, Show.self, Promote.self, Rollback.self, History.self, Download.self, Register.self, Compare.self, Token.self, BenchStore.self])

    /// Where the registry is and how to write to it.
    struct Connection: ParsableArguments {
        @Option(help: "Registry host:port (env STOCKPOT_REGISTRY_ADDRESS).")
        var registry: String = Env.string("STOCKPOT_REGISTRY_ADDRESS") ?? "127.0.0.1:\(DefaultPorts.registry)"
        @Option(help: "File holding the write token.") var tokenFile: String?
        @Flag(help: "Show and read times in UTC instead of the local zone.") var utc = false

        var zone: TimeZone { utc ? TimeZone(identifier: "UTC")! : .current }

        func run<T: Sendable>(write: Bool = false, _ body: @Sendable (RegistryClient<HTTP2ClientTransport.Posix>) async throws -> T) async throws -> T {
            let token = write ? try RegistryToken.find(file: tokenFile)?.token : nil
            do {
                return try await withGRPCClient(transport: try ServiceClient.transport(target: registry)) { client in
                    try await body(RegistryClient(wrapping: client, token: token))
                }
            } catch let e as RPCError {
                // The status code and message, not a stack of wrappers; exit status 1.
                throw Failure(description: "\(e.code): \(e.message)")
            }
        }
    }

    /// A failed registry call, printed as `Error: <code>: <message>` with exit status 1.
    struct Failure: Error, CustomStringConvertible {
        let description: String
    }

    static func json<M: SwiftProtobuf.Message>(_ messages: [M]) throws -> String {
        var options = JSONEncodingOptions()
        options.preserveProtoFieldNames = true
        return "[" + (try messages.map { try $0.jsonString(options: options) }).joined(separator: ",\n") + "]"
    }

    static func json<M: SwiftProtobuf.Message>(_ message: M) throws -> String {
        var options = JSONEncodingOptions()
        options.preserveProtoFieldNames = true
        return try message.jsonString(options: options)
    }

    static func describe(_ m: Stockpot_V1_AliasMove, zone: TimeZone) -> String {
        let from = m.previousVersion == 0 ? "(new)" : "\(m.name):\(m.previousVersion)"
        let to = m.version == 0 ? "(removed)" : "\(m.name):\(m.version)"
        var line = "#\(m.id)  \(RegistryTime.format(m.atMs, zone: zone))  \(m.name)@\(m.alias): \(from) → \(to)  \(m.action) by \(m.actor.isEmpty ? "?" : m.actor)"
        if !m.reason.isEmpty { line += "  — \(m.reason)" }
        if m.batch != 0 { line += "  [batch #\(m.batch)]" }
        if !m.overrides.isEmpty { line += "\n      FORCED over: " + m.overrides.joined(separator: "; ") }
        return line
    }

    struct List: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "List versions (of one model, or all).")
        @OptionGroup var connection: Connection
        @Argument(help: "Model name (default: every model).") var name: String?
        @Flag(help: "JSON output.") var json = false

        func run() async throws {
            let name = self.name ?? ""
            let versions = try await connection.run { try await $0.stub.listVersions(.with { $0.name = name }).versions }
            if json { Console.out(try RegistryCommand.json(versions)); return }
            Console.out("NAME".padded(20) + "VERSION".padded(9) + "KIND".padded(16) + "CREATED".padded(46) + "BY".padded(14) + "ALIASES")
            for v in versions {
                Console.out(v.name.padded(20) + "\(v.version)".padded(9) + v.kind.padded(16)
                            + RegistryTime.format(v.createdAtMs, zone: connection.zone).padded(46) + v.createdBy.padded(14)
                            + v.aliases.joined(separator: ","))
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "One version: metadata, lineage back to the first ancestor, metrics, files, aliases.")
        @OptionGroup var connection: Connection
        @Argument(help: "name:version or name@alias.") var ref: String
        @Flag(help: "JSON output: {\"version\": …, \"ancestors\": [parent, grandparent, …]}.") var json = false

        func run() async throws {
            let ref = self.ref
            let (version, ancestors) = try await connection.run { registry -> (Stockpot_V1_ModelVersion, [Stockpot_V1_ModelVersion]) in
                let v = try await registry.resolve(ref)
                var chain: [Stockpot_V1_ModelVersion] = []
                var next = v.lineage.parent
                var seen: Set<String> = ["\(v.name):\(v.version)"]
                while !next.isEmpty, seen.insert(next).inserted, chain.count < 1000 {
                    let parent = try await registry.resolve(next)
                    chain.append(parent)
                    next = parent.lineage.parent
                }
                return (v, chain)
            }
            if json {
                Console.out("{\"version\": \(try RegistryCommand.json(version)), \"ancestors\": \(try RegistryCommand.json(ancestors))}")
                return
            }
            let zone = connection.zone
            Console.out("\(version.name):\(version.version)  kind \(version.kind)  aliases \(version.aliases.isEmpty ? "none" : version.aliases.joined(separator: ", "))")
            Console.out("created \(RegistryTime.format(version.createdAtMs, zone: zone)) by \(version.createdBy.isEmpty ? "?" : version.createdBy)")
            Console.out("artifact sha256 \(version.artifactSha256)")
            let l = version.lineage
            Console.out("lineage:")
            if !l.trainedOn.isEmpty { Console.out("  trained on (legacy logits of) \(l.trainedOn)") }
            if !l.teacher.isEmpty { Console.out("  teacher \(l.teacher)") }
            if !l.trainingDays.isEmpty { Console.out("  training days \(Self.days(l.trainingDays))") }
            if !l.featureSetVersion.isEmpty { Console.out("  feature set \(l.featureSetVersion)") }
            var line = "  \(version.name):\(version.version)"
            for a in ancestors {
                line += " ← \(a.name):\(a.version)"
                if !a.lineage.trainingDays.isEmpty { line += " (\(Self.days(a.lineage.trainingDays)))" }
            }
            Console.out(ancestors.isEmpty ? "  no warm-start parent: the first of its line" : line + "  (first ancestor)")
            if !version.metrics.isEmpty {
                Console.out("metrics:")
                for (k, v) in version.metrics.sorted(by: { $0.key < $1.key }) { Console.out("  \(k) = \(v)") }
            }
            if !version.metadata.isEmpty {
                Console.out("metadata:")
                for (k, v) in version.metadata.sorted(by: { $0.key < $1.key }) { Console.out("  \(k): \(v)") }
            }
            Console.out("files:")
            for f in version.files { Console.out("  \(f.path)  \(f.size) bytes  sha256 \(f.sha256)") }
        }

        static func days(_ d: [Int32]) -> String {
            guard let first = d.min(), let last = d.max() else { return "" }
            return first == last ? "\(first)" : "\(first)..\(last) (\(d.count) days)"
        }
    }

    struct Promote: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Point an alias at a version, with a reason, under the lineage and metric guards.",
            discussion: """
            By default the move happens only if the alias still points where it did when the command looked \
            (compare-and-set): two promotions at once cannot silently overwrite each other. A legacy version is \
            refused while correctors on the same alias are bound to another legacy version: move them together \
            with --with corrector-tail:9, or override with --force (admin; recorded in the history).
            """)
        @OptionGroup var connection: Connection
        @Argument(help: "The version to promote: name:version (or name@alias).") var ref: String
        @Option(help: "Alias to move, e.g. production or canary.") var alias: String
        @Option(help: "Why (kept in the history).") var reason: String
        @Option(name: .customLong("with"), help: "Another version to move to the same alias in the same transaction (repeatable).")
        var together: [String] = []
        @Option(help: "Metric requirement, e.g. 'auc.is_click.tail>=0.71' (repeatable).") var require: [String] = []
        @Option(help: "Move only if the alias now points at this version (0 = must not exist); default: what it points at when the command starts.")
        var expectVersion: Int64?
        @Flag(help: "Override the lineage guard (admin token; recorded).") var force = false
        @Flag(help: "JSON output.") var json = false

        func run() async throws {
            let (ref, alias, reason, together, require, explicit, force) = (self.ref, self.alias, self.reason, self.together, self.require, expectVersion, self.force)
            let zone = connection.zone
            let response = try await connection.run(write: true) { registry in
                var expect = explicit
                if expect == nil, case .success(let r) = ModelReference.parse(ref) {
                    do { expect = try await registry.resolve("\(r.name)@\(alias)").version } catch let e as RPCError where e.code == .notFound { expect = 0 }
                }
                return try await registry.promote(ref, alias: alias, reason: reason, together: together, require: require,
                                                  expectVersion: expect, force: force)
            }
            if json { Console.out(try RegistryCommand.json(response)); return }
            if response.moves.isEmpty { Console.out("\(response.version.name)@\(alias) already points at \(response.version.name):\(response.version.version); nothing moved") }
            for m in response.moves { Console.out(RegistryCommand.describe(m, zone: zone)) }
        }
    }

    struct Rollback: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Move an alias back to the version it held before its last move (and the rest of that move's batch).",
            discussion: "A rollback is itself a move: two in a row return to where you started. To go further back, promote the version you want (history lists them).")
        @OptionGroup var connection: Connection
        @Argument(help: "Model name.") var name: String
        @Option(help: "Alias to roll back.") var alias: String
        @Option(help: "Why (kept in the history).") var reason: String
        @Option(help: "Roll back only if the alias now points at this version.") var expectVersion: Int64?
        @Flag(help: "Override the lineage guard (admin token; recorded).") var force = false
        @Flag(help: "JSON output.") var json = false

        func run() async throws {
            let (name, alias, reason, expect, force) = (self.name, self.alias, self.reason, expectVersion, self.force)
            let zone = connection.zone
            let response = try await connection.run(write: true) { registry in
                try await registry.rollback(name: name, alias: alias, reason: reason, expectVersion: expect, force: force)
            }
            if json { Console.out(try RegistryCommand.json(response)); return }
            for m in response.moves { Console.out(RegistryCommand.describe(m, zone: zone)) }
        }
    }

    struct History: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Every alias move of a model (when, who, from, to, why), or what an alias pointed at on a date.",
            discussion: "Example: stockpot registry history legacy@production --at '2026-11-20 14:00'")
        @OptionGroup var connection: Connection
        @Argument(help: "NAME or NAME@ALIAS.") var target: String
        @Option(help: "Only the move in effect at this time (local zone unless it names one; or epoch ms).") var at: String?
        @Option(help: "Only the newest N moves.") var limit: Int32?
        @Flag(help: "JSON output.") var json = false

        func validate() throws {
            if let at, RegistryTime.parse(at) == nil {
                throw ValidationError("--at '\(at)' is not a time: use e.g. '2026-11-20 14:00', '2026-11-20T14:00Z', '2026-11-20 14:00 +01:00' or epoch milliseconds")
            }
            if let limit, limit <= 0 { throw ValidationError("--limit must be positive") }
            let parts = target.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            guard let name = parts.first, ModelReference.isValidName(name), parts.count == 1 || ModelReference.isValidName(parts[1]) else {
                throw ValidationError("'\(target)' is not NAME or NAME@ALIAS")
            }
        }

        func run() async throws {
            let parts = target.split(separator: "@", maxSplits: 1, omittingEmptySubsequences: false).map(String.init)
            let name = parts[0], alias = parts.count > 1 ? parts[1] : ""
            let atMs = at.flatMap { RegistryTime.parse($0, zone: connection.zone) } ?? 0
            let limit = self.limit ?? 0
            let response = try await connection.run { registry in
                try await registry.stub.history(.with { $0.name = name; $0.alias = alias; $0.atMs = atMs; $0.limit = limit })
            }
            if json { Console.out(try RegistryCommand.json(response)); return }
            let moves = response.moves
            if atMs != 0 {
                let when = RegistryTime.format(atMs, zone: connection.zone)
                if moves.isEmpty { Console.out("\(target) did not exist at \(when)") }
                for m in moves {
                    Console.out(m.version == 0 ? "at \(when): \(m.name)@\(m.alias) did not exist (removed by move #\(m.id))"
                                               : "at \(when): \(m.name)@\(m.alias) was \(m.name):\(m.version)  (since move #\(m.id))")
                }
            }
            for m in moves { Console.out(RegistryCommand.describe(m, zone: connection.zone)) }
            if moves.isEmpty && atMs == 0 { Console.out("no alias of \(target) has ever been set") }
            for f in response.loadFailures {
                let error = RegistryService.printable(f.error)
                Console.out("load failed  \(RegistryTime.format(f.atMs, zone: connection.zone))  \(f.name):\(f.version) on \(f.replica): \(error)")
            }
        }
    }

    struct Download: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Download a version's files into a folder (every file's sha256 verified).")
        @OptionGroup var connection: Connection
        @Argument(help: "name:version or name@alias.") var ref: String
        @Argument(help: "Destination folder (created; must be empty if it exists).") var dir: String

        func run() async throws {
            let dest = URL(fileURLWithPath: dir)
            let fm = FileManager.default
            if let existing = try? fm.contentsOfDirectory(atPath: dest.path), !existing.isEmpty {
                throw ValidationError("\(dir) exists and is not empty")
            }
            let ref = self.ref
            let scratch = dest.deletingLastPathComponent().appendingPathComponent(".stockpot-download-\(UUID().uuidString)")
            defer { try? fm.removeItem(at: scratch) }
            let (version, folder) = try await connection.run { try await $0.fetch(ref, cache: scratch) }
            try fm.createDirectory(at: dest, withIntermediateDirectories: true)
            for f in version.files {
                let to = dest.appendingPathComponent(f.path)
                try fm.createDirectory(at: to.deletingLastPathComponent(), withIntermediateDirectories: true)
                try fm.copyItem(at: folder.appendingPathComponent(f.path), to: to)
            }
            Console.out("downloaded \(version.name):\(version.version) (\(version.files.count) files, sha256 verified) into \(dir)")
        }
    }

    struct Register: AsyncParsableCommand {
        static let configuration = CommandConfiguration(abstract: "Upload a folder as the next version of a model, with its lineage and metrics.")
        @OptionGroup var connection: Connection
        @Argument(help: "Folder to upload (every regular file, recursively; hidden files skipped).") var dir: String
        @Option(help: "Model name.") var name: String
        @Option(help: "Kind: legacy, corrector, fusion-config…") var kind: String
        @Option(help: "Warm-start parent (name:version or name@alias, resolved now).") var parent: String?
        @Option(help: "Distillation teacher (default: the folder's metadata `teacher`, when it is a registry reference).") var teacher: String?
        @Option(help: "For a corrector (required): the legacy version whose logits it was trained on.") var trainedOn: String?
        @Option(help: "Training days, yyyymmdd..yyyymmdd or comma-separated.") var trainingDays: String?
        @Option(help: "Feature-set version.") var featureSet: String?
        @Option(help: "JSON file of metrics {\"auc.is_click.tail\": 0.71, …}.") var metricsFile: String?
        @Option(help: "A metric, key=value (repeatable).") var metric: [String] = []
        @Option(help: "Free-form metadata, key=value (repeatable).") var metadata: [String] = []
        @Option(help: "Upload only these files, comma-separated paths relative to DIR (e.g. model.json,weights.safetensors of a training checkpoint).")
        var only: String?
        @Flag(help: "JSON output.") var json = false

        func validate() throws {
            if kind == "corrector" && trainedOn == nil { throw ValidationError("a corrector needs --trained-on LEGACY_REF") }
        }

        /// Every calendar day of the range, as yyyymmdd.
        static func calendarDays(_ range: DayRange) -> [Int32] {
            let f = DateFormatter()
            f.locale = Locale(identifier: "en_US_POSIX")
            f.timeZone = TimeZone(identifier: "UTC")!
            f.dateFormat = "yyyyMMdd"
            guard var d = f.date(from: "\(range.first)") else { return [] }
            var out: [Int32] = []
            while let day = Int32(f.string(from: d)), day <= range.last, out.count < 100_000 {
                out.append(day)
                d = d.addingTimeInterval(86_400)
            }
            return out
        }

        func run() async throws {
            var metrics: [String: Double] = [:]
            if let metricsFile {
                metrics = try JSONDecoder().decode([String: Double].self, from: Data(contentsOf: URL(fileURLWithPath: metricsFile)))
            }
            for m in metric {
                let kv = m.split(separator: "=", maxSplits: 1)
                guard kv.count == 2, let v = Double(kv[1]) else { throw ValidationError("--metric '\(m)' is not key=number") }
                metrics[String(kv[0])] = v
            }
            // A model folder's own metadata (training days, steps, seed…) comes along; --metadata adds or overrides.
            let folderURL = URL(fileURLWithPath: dir).resolvingSymlinksInPath()
            let spec = try? JSONDecoder().decode(ModelSpec.self, from: Data(contentsOf: folderURL.appendingPathComponent("model.json")))
            var meta: [String: String] = spec?.metadata ?? [:]
            for m in metadata {
                let kv = m.split(separator: "=", maxSplits: 1)
                guard kv.count == 2 else { throw ValidationError("--metadata '\(m)' is not key=value") }
                meta[String(kv[0])] = String(kv[1])
            }
            var days: [Int32] = (spec?.metadata["days"] ?? "").split(separator: ",").compactMap { Int32($0) }
            if let trainingDays {
                if trainingDays.contains("..") { days = Self.calendarDays(try parseDays(trainingDays)) }
                else { days = try trainingDays.split(separator: ",").map { guard let d = Int32($0) else { throw ValidationError("bad day '\($0)'") }; return d } }
            }
            let lineage = Stockpot_V1_Lineage.with {
                $0.parent = parent ?? ""
                // A student's folder names its teacher; a registry reference there becomes the lineage's teacher.
                $0.teacher = teacher ?? spec?.metadata["teacher"].flatMap { t in
                    if case .success = ModelReference.parse(t) { return t } else { return nil }
                } ?? ""
                $0.trainedOn = trainedOn ?? ""
                $0.trainingDays = days
                $0.featureSetVersion = featureSet ?? spec?.featureSetVersion ?? ""
            }
            let (name, kind, folder, m, measured) = (self.name, self.kind, URL(fileURLWithPath: dir).resolvingSymlinksInPath(), meta, metrics)
            let files = only.map { Set($0.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }) }
            let version = try await connection.run(write: true) { registry in
                try await registry.register(name: name, kind: kind, metadata: m, lineage: lineage, metrics: measured, folder: folder, only: files)
            }
            if json { Console.out(try RegistryCommand.json(version)); return }
            Console.out("registered \(version.name):\(version.version) (\(version.files.count) files, sha256 \(version.artifactSha256.prefix(12))…)")
        }
    }

    struct Compare: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "How a shadow version compares with what served, per crowd and objective (from a gateway's running comparisons).",
            discussion: "Example: stockpot registry promote legacy:7 --alias shadow --reason 'try day 7'; later: stockpot registry compare legacy@shadow")
        @OptionGroup var connection: Connection
        @Argument(help: "The shadow version: name:version or name@alias (resolved through the registry).") var ref: String
        @Option(help: "Gateway host:port (env STOCKPOT_GATEWAY_ADDRESS).")
        var gateway: String = Env.string("STOCKPOT_GATEWAY_ADDRESS") ?? "127.0.0.1:\(DefaultPorts.gateway)"
        @Flag(help: "JSON output.") var json = false

        func run() async throws {
            let ref = self.ref
            let version = try await connection.run { try await $0.resolve(ref) }
            let model = "\(version.name):\(version.version)"
            let report: Stockpot_V1_ShadowReportResponse
            do {
                report = try await withGRPCClient(transport: try ServiceClient.transport(target: gateway)) { client in
                    try await Stockpot_V1_GatewayService.Client(wrapping: client).shadowReport(.with { $0.model = model })
                }
            } catch let e as RPCError {
                throw Failure(description: "gateway \(gateway): \(e.code): \(e.message)")
            }
            if json { Console.out(try RegistryCommand.json(report)); return }
            Console.out("shadow \(model) — sampled \(report.sampled), dropped \(report.dropped), failed \(report.failed) (all shadow versions)")
            guard !report.comparisons.isEmpty else {
                Console.out("no comparison yet: is \(model) the scorer's shadow (promote it --alias shadow) and --shadow-percent above 0?")
                return
            }
            Console.out("primary".padded(16) + "crowd".padded(8) + "objective".padded(12) + "requests".padded(10) + "top-k overlap".padded(15)
                        + "rank corr".padded(11) + "|Δ score|".padded(11) + "shadow ms".padded(11) + "primary ms")
            for c in report.comparisons {
                Console.out("\(c.primary.name):\(c.primary.version)".padded(16) + c.crowd.padded(8) + c.objective.padded(12) + "\(c.requests)".padded(10)
                            + String(format: "%.3f", c.meanTopKOverlap).padded(15) + String(format: "%.3f", c.meanRankCorrelation).padded(11)
                            + String(format: "%.4f", c.meanAbsScoreDelta).padded(11) + String(format: "%.2f", c.meanShadowLatencyMs).padded(11)
                            + String(format: "%.2f", c.meanPrimaryLatencyMs))
            }
        }
    }

    struct Token: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Create a write token: adds its sha256 to a registry tokens file and prints the token once.",
            discussion: "The registry re-reads the tokens file when it changes; delete an entry to revoke a token.")
        @Option(help: "Name recorded as the actor of this token's writes.") var name: String
        @Option(help: "Roles, comma-separated: register, promote, admin.") var roles: String
        @Option(help: "The registry's tokens file (created with mode 600).") var tokensFile: String
        @Option(help: "Write the token to this file (mode 600) instead of printing it.") var out: String?

        func run() async throws {
            var parsed: [AccessControl.Role] = []
            for r in roles.split(separator: ",") {
                guard let role = AccessControl.Role(rawValue: r.trimmingCharacters(in: .whitespaces)) else {
                    throw ValidationError("unknown role '\(r)': register, promote or admin")
                }
                parsed.append(role)
            }
            let token = AccessControl.newToken()
            // Delivered first, then made valid: a token nobody received never works.
            if let out {
                try AccessControl.writePrivate(Data((token + "\n").utf8), to: URL(fileURLWithPath: out))
            } else {
                Console.out(token)
            }
            try AccessControl.addToken(name: name, roles: parsed, token: token, to: URL(fileURLWithPath: tokensFile))
            Console.info("token '\(name)' (\(parsed.map(\.rawValue).joined(separator: ","))) added to \(tokensFile)"
                         + (out.map { "; written to \($0)" } ?? "; it is shown only now"))
        }
    }
}
