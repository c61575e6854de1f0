/// A reference to a registry entry: `name@alias` (e.g. `legacy@production`) or `name:version` (e.g. `legacy:7`).
public struct ModelReference: Sendable, Hashable, CustomStringConvertible {
    public enum Selector: Sendable, Hashable {
        case alias(String)
        case version(Int64)
    }

    public var name: String
    public var selector: Selector

    public init(name: String, selector: Selector) {
        self.name = name
        self.selector = selector
    }

    /// Parses `name@alias` or `name:version`; `nil` with a reason otherwise.
    public static func parse(_ text: String) -> Result<ModelReference, ReferenceError> {
        if let at = text.firstIndex(of: "@") {
            let name = String(text[..<at]), alias = String(text[text.index(after: at)...])
            guard isValidName(name), isValidName(alias) else { return .failure(ReferenceError(text: text)) }
            return .success(ModelReference(name: name, selector: .alias(alias)))
        }
        if let colon = text.lastIndex(of: ":") {
            let name = String(text[..<colon])
            guard isValidName(name), let v = Int64(text[text.index(after: colon)...]), v > 0 else {
                return .failure(ReferenceError(text: text))
            }
            return .success(ModelReference(name: name, selector: .version(v)))
        }
        return .failure(ReferenceError(text: text))
    }

    /// Names and aliases: 1–64 characters of letters, digits, `-`, `_`, `.`, starting with a letter or a digit.
    /// A name is a folder of the artifact store: `.`, `..` and hidden names (`.incoming`) are never valid.
    public static func isValidName(_ s: String) -> Bool {
        guard let first = s.utf8.first, (first >= 0x30 && first <= 0x39) || (first >= 0x41 && first <= 0x5a) || (first >= 0x61 && first <= 0x7a) else {
            return false
        }
        return s.count <= 64 && s.utf8.allSatisfy { c in
            (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c == 0x2d || c == 0x5f || c == 0x2e
        }
    }

    public var description: String {
        switch selector {
        case .alias(let a): return "\(name)@\(a)"
        case .version(let v): return "\(name):\(v)"
        }
    }

    /// Why a reference did not parse.
    public struct ReferenceError: Error, CustomStringConvertible {
        public let text: String
        public var description: String {
            "'\(text)' is not a model reference: expected name@alias or name:version (names: letters, digits, - _ ., starting with a letter or digit)"
        }
    }
}
