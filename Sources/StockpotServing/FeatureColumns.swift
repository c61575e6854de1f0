import StockpotModel
import StockpotProto

/// A feature column's rows as `FeatureValue`s, read without copying the column: the form it travelled in (text,
/// integers or numbers, `Stockpot_V1_FeatureColumn`) and which rows are missing. Made once per column and
/// request from a column that passed `Stockpot_V1_FeatureColumn.problem(rows:)`; reading a row past `count`
/// traps. A class, so that handing it around per row costs one reference, not one per array it holds.
public final class FeatureColumnReader: Sendable {
    /// Which field of the column holds its rows.
    public enum Form: Sendable, Equatable { case text, integers, numbers }

    /// The column's name (a feature name, e.g. `video_duration`).
    public let name: String
    /// The form the column travelled in.
    public let form: Form
    /// Rows in the column.
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
    public subscript(i: Int) -> FeatureValue {
        if !missingRows.isEmpty && missingRows[i] { return .missing }
        switch form {
        case .text: return texts[i].isEmpty ? .missing : .text(texts[i])
        case .integers: return .integer(integers[i])
        case .numbers: return .number(numbers[i])
        }
    }

    /// The text of row `i` ("" when missing), as the feature files hold it.
    public func text(_ i: Int) -> String {
        form == .text ? texts[i] : self[i].text
    }

    /// Feeds row `i` into a running FNV-1a hash as one self-delimited value: a content key (for a cache of
    /// encoded items, the serving log's item versions). Text and integers are fed as their text, and a missing
    /// value alike in every form, so an integer hashes alike whether its column travelled as text or as
    /// integers (the form is chosen per reply, and a column such as KuaiRand's `tag`, with "39" beside
    /// "39,12", travels either way); a number is fed as its bits (the same number as text feeds its text: a
    /// cache miss at worst, never a wrong hit).
    public func feed(_ i: Int, into h: inout UInt64) {
        if (!missingRows.isEmpty && missingRows[i]) || (form == .text && texts[i].isEmpty) {
            FeatureHash.feed(byte: Self.missingTag, into: &h)   // missing, alike in every form
            return
        }
        switch form {
        case .text:
            FeatureHash.feed(byte: Self.textTag, into: &h)
            FeatureHash.feed(texts[i].utf8, into: &h)
        case .integers:
            FeatureHash.feed(byte: Self.textTag, into: &h)   // an integer as its text
            FeatureHash.feed(integer: integers[i], into: &h)
        case .numbers:
            FeatureHash.feed(byte: Self.numberTag, into: &h)
            FeatureHash.feed(bits: numbers[i].bitPattern, into: &h)
        }
        FeatureHash.feed(byte: 0xFF, into: &h)   // end of the value: 0xFF is never a byte of UTF-8 text
    }

    /// What `feed` starts a value with: a missing row (of a typed column), text (and integers, as their text),
    /// a number's bits.
    static let missingTag: UInt64 = 0x10, textTag: UInt64 = 0x11, numberTag: UInt64 = 0x13
}

extension Stockpot_V1_FeatureColumn {
    /// A column holding `featureValues`: when `typed`, as integers if every present value is an integer and as
    /// numbers if every present value is a number; as text otherwise. `.text("")` counts as missing, and a number
    /// no typed column may hold (NaN, infinite, -0.0) makes the column text.
    public init(name: String, featureValues values: [FeatureValue], typed: Bool) {
        self.init()
        self.name = name
        if typed, let form = Self.typedForm(of: values) {
            setTyped(values, as: form)
        } else {
            self.values = values.map(\.text)
        }
    }

    /// The two typed forms of a column.
    public enum TypedForm: Sendable { case integers, numbers }

    /// The typed form `values` can travel in: integers when every present value is an integer, numbers when
    /// every one is a representable number; nil when none is present or any is text.
    public static func typedForm(of values: [FeatureValue]) -> TypedForm? {
        var integers = true, numbers = true, present = false
        for v in values {
            switch v {
            case .missing: continue
            case .text(let s):
                if s.isEmpty { continue }
                return nil
            case .integer: numbers = false
            case .number(let x):
                integers = false
                if !FeatureValue.isRepresentable(x) { return nil }
            }
            present = true
            if !integers && !numbers { return nil }
        }
        guard present else { return nil }
        return integers ? .integers : .numbers
    }

    /// Sets the column's rows to `values` in `form` (from `typedForm(of:)`): `integers` or `numbers`, and
    /// `missing`; the other forms emptied.
    public mutating func setTyped(_ values: [FeatureValue], as form: TypedForm) {
        self.values = []
        integers = []
        numbers = []
        var missing: [UInt32] = []
        switch form {
        case .integers:
            integers = values.enumerated().map { i, v in
                if case .integer(let x) = v { return x }
                missing.append(UInt32(i))
                return 0
            }
        case .numbers:
            numbers = values.enumerated().map { i, v in
                if case .number(let x) = v { return x }
                missing.append(UInt32(i))
                return 0
            }
        }
        self.missing = missing
    }

    /// The text of row `i` ("" when missing, and for a row the column does not have), without a reader: for
    /// reading a row or two (a user's features) of a column that passed `problem(rows:)`.
    public func text(_ i: Int) -> String {
        guard i >= 0 else { return "" }
        if !integers.isEmpty {
            return i < integers.count && !missing.contains(UInt32(i)) ? String(integers[i]) : ""
        }
        if !numbers.isEmpty {
            return i < numbers.count && !missing.contains(UInt32(i)) ? String(numbers[i]) : ""
        }
        return i < values.count ? values[i] : ""
    }

    /// What is wrong with this column as a column of `rows` rows, or nil: an empty name, more than one form
    /// filled, a length other than `rows`, missing rows in a text column or out of range or order, a number that
    /// is not finite or is -0.0 (outside the missing rows, whose entries are ignored).
    public func problem(rows: Int) -> String? {
        guard !name.isEmpty else { return "a column has an empty name" }
        let filled = (values.isEmpty ? 0 : 1) + (integers.isEmpty ? 0 : 1) + (numbers.isEmpty ? 0 : 1)
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
        guard !numbers.isEmpty else { return nil }
        var next = 0
        for i in numbers.indices {
            if next < missing.count && Int(missing[next]) == i { next += 1; continue }
            guard FeatureValue.isRepresentable(numbers[i]) else {
                return "'\(name)'.numbers[\(i)] is \(numbers[i]) (numbers must be finite and not -0.0)"
            }
        }
        return nil
    }
}

extension Stockpot_V1_EntityBatch {
    /// What is wrong with the batch's columns as columns of `ids.count` rows (each `FeatureColumn.problem`, and
    /// no name twice), prefixed with `field`; nil when none.
    public func columnProblem(field: String) -> String? {
        var names = Set<String>(minimumCapacity: columns.count)
        for i in columns.indices {   // by index: no copy of each column
            if let problem = columns[i].problem(rows: ids.count) { return "\(field).columns: \(problem)" }
            guard names.insert(columns[i].name).inserted else { return "\(field).columns: '\(columns[i].name)' given twice" }
        }
        return nil
    }
}
