import ArgumentParser
import Foundation
import GRPCCore
import GRPCNIOTransportHTTP2Posix
import StockpotProto
import StockpotServing
import StockpotTraining

/// `stockpot features`: batch jobs that write into the feature service.
struct Features: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Write features into a running feature service; measure the feature stores.", subcommands: [PutHistory.self, BenchStore.self])

    /// Each user's recent history, for models with target attention.
    struct PutHistory: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            commandName: "put-history",
            abstract: "Write each user's recent history (the last videos they clicked, as of a day) into the feature service.",
            discussion: """
            The daily job that keeps the history a model with target attention reads (its attention's `userColumn`, \
            default recent_clicks): for every user with an interaction on or before --through, the last --length \
            videos, ids joined by commas, most recent last, written with PutFeatures in batches (other columns of the \
            user's row are kept).
            """)

        @OptionGroup var dataOptions: DataOptions
        @Option(help: "Last day of interactions included, yyyymmdd.") var through: Int
        @Option(help: "Videos kept per user (the model's attention length or more).") var length: Int = 20
        @Option(help: "Log column that makes an impression an interaction.") var interaction: String = "is_click"
        @Option(help: "User feature to write (the model's attention userColumn).") var column: String = "recent_clicks"
        @Option(help: "Feature service host:port (env STOCKPOT_FEATURES_ADDRESS).")
        var features: String = Env.string("STOCKPOT_FEATURES_ADDRESS") ?? "127.0.0.1:\(DefaultPorts.features)"
        @Option(help: "Users per PutFeatures call.") var batch: Int = 500

        func validate() throws {
            guard DayRange.isDate(through) else { throw ValidationError("--through \(through) is not a yyyymmdd date") }
            guard (1...1024).contains(length) else { throw ValidationError("--length must be 1...1024") }
            guard (1...5000).contains(batch) else { throw ValidationError("--batch must be 1...5000") }
            guard !column.isEmpty else { throw ValidationError("--column is empty") }
        }

        func run() async throws {
            let (data, _) = try dataOptions.load()
            guard !data.users.header.contains(column) else {
                throw ValidationError("--column \(column) is a column of the user table: writing it would overwrite that feature")
            }
            let histories = try InteractionHistory.latest(data: data, through: through, label: interaction, length: length)
            guard !histories.isEmpty else { throw ValidationError("no \(interaction) interaction on or before \(through)") }
            let users = histories.keys.sorted()
            let (column, batch, features) = (self.column, self.batch, self.features)
            Console.info("writing \(column) for \(users.count) users (as of \(through), last \(length) \(interaction)) to \(features)")
            // Calls of at most `batch` users and about 1 MiB of text, well under a message's 4 MiB limit.
            var chunks: [[Int]] = [[]]
            var bytes = 0
            for u in users {
                let size = histories[u]!.count * 12
                if chunks[chunks.count - 1].count == batch || (bytes + size > 1 << 20 && !chunks[chunks.count - 1].isEmpty) {
                    chunks.append([])
                    bytes = 0
                }
                chunks[chunks.count - 1].append(u)
                bytes += size
            }
            let written = try await withGRPCClient(transport: try ServiceClient.transport(target: features)) { client in
                let service = Stockpot_V1_FeatureService.Client(wrapping: client)
                var written = 0
                var options = CallOptions.defaults
                options.timeout = .seconds(30)
                for (n, chunk) in chunks.enumerated() {
                    do {
                        let reply = try await service.putFeatures(.with {
                            $0.kind = .user
                            $0.rows = .with { b in
                                b.ids = chunk.map(Int64.init)
                                b.columns = [.with { c in
                                    c.name = column
                                    c.values = chunk.map { histories[$0]!.map(String.init).joined(separator: ",") }
                                }]
                            }
                        }, options: options)
                        guard reply.written == chunk.count else {
                            throw ValidationError("the feature service wrote \(reply.written) of \(chunk.count) users in one call")
                        }
                    } catch {
                        // What is stored stays stored (each call is its own transaction): say how far it got.
                        Console.info("stopped after \(written)/\(users.count) users (every user id below \(chunk.first!) written): \(error)")
                        throw error
                    }
                    written += chunk.count
                    if n % 10 == 9 { Console.info("  \(written)/\(users.count) users") }
                }
                return written
            }
            Console.out("wrote \(column) for \(written) users into \(features)")
        }
    }
}
