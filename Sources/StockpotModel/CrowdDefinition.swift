import Foundation

/// Splits users into crowds by one attribute: named groups of values, and one crowd for everything else.
public struct CrowdDefinition: Codable, Sendable, Equatable {
    /// Source of the attribute, e.g. `user:user_active_degree`.
    public var source: String
    public var groups: [Group]
    /// Name of the crowd of every value not listed in a group (e.g. `tail`).
    public var otherwise: String

    public struct Group: Codable, Sendable, Equatable {
        public var name: String
        public var values: [String]

        public init(name: String, values: [String]) {
            self.name = name
            self.values = values
        }
    }

    public init(source: String, groups: [Group], otherwise: String) {
        self.source = source
        self.groups = groups
        self.otherwise = otherwise
    }

    /// The crowd a raw attribute value belongs to.
    public func crowd(of value: String) -> String {
        for g in groups where g.values.contains(value) { return g.name }
        return otherwise
    }

    /// Crowd names in report order.
    public var names: [String] { groups.map(\.name) + [otherwise] }
}

extension CrowdDefinition {
    /// Head = full and high activity; tail = every other `user_active_degree` (KuaiRand's degrees).
    public static let activity = CrowdDefinition(
        source: "user:user_active_degree",
        groups: [Group(name: "head", values: ["full_active", "high_active"])],
        otherwise: "tail")

    /// The user feature column the crowd attribute is read from (`user:<column>` sources), or nil.
    public var userColumn: String? {
        guard source.hasPrefix("user:") else { return nil }
        return String(source.dropFirst(5))
    }

    /// The request context column the crowd attribute is read from (`log:<column>` sources: a column of the
    /// impression, such as the campaign or the tab, that a Rank request carries in its context), or nil.
    public var contextColumn: String? {
        guard source.hasPrefix("log:") else { return nil }
        return String(source.dropFirst(4))
    }

    /// The crowd of a request: its attribute read from the user's features (`user:`) or the request's context
    /// (`log:`); a missing attribute, or a source of another kind, is the `otherwise` crowd.
    public func crowd(userFeatures: [String: String], context: [String: String]) -> String {
        if let c = userColumn { return crowd(of: userFeatures[c] ?? "") }
        if let c = contextColumn { return crowd(of: context[c] ?? "") }
        return otherwise
    }

    /// Reads a crowd definition from JSON: the definition itself, or any document that holds one under
    /// `crowds` (a dataset spec, a feature config), so serving reads the crowds from the file training read.
    public static func decode(from data: Data) throws -> CrowdDefinition {
        struct Holder: Decodable { var crowds: CrowdDefinition? }
        if let d = try? JSONDecoder().decode(CrowdDefinition.self, from: data) { return d }
        if let h = try? JSONDecoder().decode(Holder.self, from: data), let d = h.crowds { return d }
        // Neither: the definition's own error is the useful one.
        return try JSONDecoder().decode(CrowdDefinition.self, from: data)
    }
}
