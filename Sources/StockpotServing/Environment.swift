import Foundation

/// Environment-variable defaults for service flags: every flag `--x-y` of service `s` can also be set as
/// `STOCKPOT_<S>_X_Y` (flags win).
public enum Env {
    public static func string(_ name: String) -> String? {
        ProcessInfo.processInfo.environment[name].flatMap { $0.isEmpty ? nil : $0 }
    }

    public static func int(_ name: String) -> Int? { string(name).flatMap(Int.init) }
    public static func double(_ name: String) -> Double? { string(name).flatMap(Double.init) }
    public static func bool(_ name: String) -> Bool? {
        string(name).map { ["1", "true", "yes"].contains($0.lowercased()) }
    }
}

/// Default loopback ports of the six services.
public enum DefaultPorts {
    public static let registry = 50051
    public static let features = 50052
    public static let scorer = 50053
    public static let corrector = 50054
    public static let fusion = 50055
    public static let gateway = 50056
}
