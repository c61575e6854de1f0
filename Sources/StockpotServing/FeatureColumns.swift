import StockpotModel
import StockpotProto

/// A feature column's rows as `FeatureValue`s, read without copying the column: the form it travelled in (text,
/// integers or numbers, `Stockpot_V1_FeatureColumn`) and which rows are missing. Made once per column and
/// request from a column that passed `Stockpot_V1_FeatureColumn.problem(rows:)`.
public struct FeatureColumnReader: Sendable {
    public enum Form: Sendable, Equatable { case text, integers, numbers }

    public let name: String
    public let form: Form
    public let count: Int
    private let texts: [String]
    private let integers: [Int64]
    private let numbers: [Double]
    /// `missing[i]` for typed columns with missing rows; empty otherwise.
    private let missingRows: [Bool]

    public init(_ column: Stockpot_V1_FeatureColumn) {
        name = column.name
        texts = column.values
        integers = column.integers
        numbers = column.numbers
        if !column.integers.isEmpty {
            form = .integers
            count = column.integers.count
        } else if !column.numbers.isEmpty {
            form = .numbers
            count = column.numbers.count
        } else {
            form = .text
            count = column.values.count
        }
        if form != .text && !column.missing.isEmpty {
            var mask = [Bool](repeating: false, count: count)
            for r in column.missing where Int(r) < count { mask[Int(r)] = true }
            missingRows = mask
        } else {
            missingRows = []
        }
    }

    /// The value of row `i`.
    @inlinable
    public subscript(i: Int) -> FeatureValue {
        value(i)
    }

    @usableFromInline
    func value(_ i: Int) -> FeatureValue {
        if !missingRows.isEmpty && missingRows[i] { return .missing }
        switch form {
        case .text: return texts[i].isEmpty ? .missing : .text(texts[i])
        case .integers: return .integer(integers[i])
        case .numbers: return .number(numbers[i])
        }
    }

    /// The text of row `i` ("" when missing), as the feature files hold it.
    public func text(_ i: Int) -> String {
        form == .text ? texts[i] : value(i).text
    }

    /// Feeds row `i` into a running FNV-1a hash, tagged with its form: equal values in one form hash alike (a
    /// content key, e.g. for a cache of encoded items; the same item sent in another form gets another key).
    @inlinable
    public func feed(_ i: Int, into h: inout UInt64) {
        feedValue(i, into: &h)
    }

    @usableFromInline
    func feedValue(_ i: Int, into h: inout UInt64) {
        let p = FeatureHash.prime
        if !missingRows.isEmpty && missingRows[i] {
            h = (h ^ 0x10) &* p
            return
        }
        switch form {
        case .text:
            h = (h ^ 0x11) &* p
            let value = texts[i]
            let done: Void? = value.utf8.withContiguousStorageIfAvailable { bytes in
                for b in bytes { h = (h ^ UInt64(b)) &* p }
            }
            if done == nil { for b in value.utf8 { h = (h ^ UInt64(b)) &* p } }
        case .integers:
            h = (h ^ 0x12) &* p
            Self.feed(bits: UInt64(bitPattern: integers[i]), into: &h)
        case .numbers:
            h = (h ^ 0x13) &* p
            Self.feed(bits: numbers[i].bitPattern, into: &h)
        }
    }

    @usableFromInline
    static func feed(bits: UInt64, into h: inout UInt64) {
        var b = bits
        for _ in 0..<8 {
            h = (h ^ (b & 0xFF)) &* FeatureHash.prime
            b >>= 8
        }
    }
}

extension Stockpot_V1_FeatureColumn {
    /// A column holding `values` in the narrowest form that keeps every value exact: integers when every present
    /// value is an integer, numbers when every present value is a number, text otherwise (and when `textOnly`).
    public init(name: String, values: [FeatureValue], textOnly: Bool = false) {
        self.init()
        self.name = name
        var integers = !textOnly, numbers = !textOnly, present = 0
        if !textOnly {
            for v in values {
                switch v {
                case .missing: continue
                case .text: integers = false; numbers = false
                case .integer: numbers = false
                case .number: integers = false
                }
                present += 1
                if !integers && !numbers { break }
            }
        }
        if present > 0 && (integers || numbers) {
            var missing: [UInt32] = []
            if integers {
                self.integers = values.enumerated().map { i, v in
                    if case .integer(let x) = v { return x }
                    missing.append(UInt32(i))
                    return 0
                }
            } else {
                self.numbers = values.enumerated().map { i, v in
                    if case .number(let x) = v { return x }
                    missing.append(UInt32(i))
                    return 0
                }
            }
            self.missing = missing
        } else {
            self.values = values.map(\.text)
        }
    }

    /// What is wrong with this column as a column of `rows` rows, or nil: an empty name, more than one form
    /// filled, a length other than `rows`, a missing row out of range or out of order, a number that is not
    /// finite or is -0.0.
    public func problem(rows: Int) -> String? {
        guard !name.isEmpty else { return "a column has an empty name" }
        let filled = [values.isEmpty, integers.isEmpty, numbers.isEmpty].filter { !$0 }.count
        guard filled <= 1 else { return "'\(name)' fills more than one of values, integers and numbers" }
        let count = max(values.count, integers.count, numbers.count)
        guard count == rows else { return "'\(name)' has \(count) values for \(rows) rows" }
        guard missing.isEmpty || values.isEmpty else {
            return "'\(name)' lists missing rows in a text column (a missing text value is \"\")"
        }
        var previous: Int64 = -1
        for r in missing {
            guard Int64(r) > previous, Int(r) < rows else {
                return "'\(name)'.missing must be increasing rows below \(rows), found \(r) after \(previous)"
            }
            previous = Int64(r)
        }
        // Entries of missing rows are ignored, whatever they hold.
        var next = 0
        for (i, x) in numbers.enumerated() {
            if next < missing.count && Int(missing[next]) == i { next += 1; continue }
            guard FeatureValue.isRepresentable(x) else {
                return "'\(name)'.numbers[\(i)] is \(x) (numbers must be finite and not -0.0)"
            }
        }
        return nil
    }
}

extension Stockpot_V1_EntityBatch {
    /// What is wrong with the batch's columns as columns of `ids.count` rows (each `FeatureColumn.problem`, and
    /// no name twice), prefixed with `field`; nil when none.
    public func columnProblem(field: String) -> String? {
        var names = Set<String>()
        for c in columns {
            if let problem = c.problem(rows: ids.count) { return "\(field).columns: \(problem)" }
            guard names.insert(c.name).inserted else { return "\(field).columns: '\(c.name)' given twice" }
        }
        return nil
    }
}
