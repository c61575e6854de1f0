import GRPCCore

/// Shorthands for the statuses Stockpot services return. Every message names the offending field.
public enum Status {
    public static func invalidArgument(_ message: String) -> RPCError { RPCError(code: .invalidArgument, message: message) }
    public static func notFound(_ message: String) -> RPCError { RPCError(code: .notFound, message: message) }
    public static func resourceExhausted(_ message: String) -> RPCError { RPCError(code: .resourceExhausted, message: message) }
    public static func unavailable(_ message: String) -> RPCError { RPCError(code: .unavailable, message: message) }
    public static func failedPrecondition(_ message: String) -> RPCError { RPCError(code: .failedPrecondition, message: message) }
    public static func dataLoss(_ message: String) -> RPCError { RPCError(code: .dataLoss, message: message) }
    public static func aborted(_ message: String) -> RPCError { RPCError(code: .aborted, message: message) }
    public static func unauthenticated(_ message: String) -> RPCError { RPCError(code: .unauthenticated, message: message) }
    public static func permissionDenied(_ message: String) -> RPCError { RPCError(code: .permissionDenied, message: message) }
    public static func `internal`(_ message: String) -> RPCError { RPCError(code: .internalError, message: message) }
}

/// Limits every service enforces on request size.
public struct RequestLimits: Sendable {
    /// Most candidates (or ids) in one request; more is RESOURCE_EXHAUSTED.
    public var maxCandidates: Int

    public init(maxCandidates: Int = 5_000) { self.maxCandidates = maxCandidates }

    public func checkCount(_ n: Int, field: String, allowEmpty: Bool = false) throws {
        if n == 0 && !allowEmpty { throw Status.invalidArgument("\(field) is empty") }
        if n > maxCandidates {
            throw Status.resourceExhausted("\(field) has \(n) entries; the limit is \(maxCandidates)")
        }
    }
}
