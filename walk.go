package storage

import (
	"context"
	"errors"
	"fmt"
	"reflect"
	"regexp"
	"regexp/syntax"
	"strings"

	"github.com/containerd/containerd/v2/pkg/filters"
	"github.com/containerd/errdefs"
)

// Walk calls fn with the whole record (name, ID, kind, parent, labels,
// times and usage) of every snapshot matching all filters (containerd filter
// syntax, as WalkInfo), in name order, in the transaction ctx carries, and
// stops at fn's first error, which it returns. It is WalkInfo with the ID and
// usage that GetInfo would add, for the cost of the walk alone:
//
//   - etcd: one round trip per page of WithPageSize records (1000 by
//     default), every page at the transaction's revision; when more than 8
//     pages are left after the first, the rest in one stream (etcd 3.7's
//     RangeStream; older servers page to the end), since etcd counts the
//     rest of the range for every page;
//   - bbolt: one cursor pass over the snapshots.
//
// Filters are checked before anything is read: one that does not parse, or
// that holds a regular expression (~=) that does not compile, is refused
// with InvalidArgument (see ValidateFilters).
//
// A record that cannot be read (it does not decode, or it is stored under a
// name no lookup reaches: see MaxNameSize) does not end the walk: fn is not
// called for it, and once every other record has been handed over, Walk
// returns a *CorruptRecordsError naming each such record (class DataLoss,
// errors.Is ErrCorrupt). Check reports the same records. A damaged layout,
// or a failed read, ends the walk with its error. As with WalkInfo, fn may
// use the transaction, and Record.Labels is fn's to keep.
func Walk(ctx context.Context, fn func(Record) error, filters ...string) error {
	t, err := ownTransaction(ctx)
	if err != nil {
		return err
	}
	if err := t.ready(ctx, false); err != nil {
		return err
	}
	filter, err := parseFilters(filters...)
	if err != nil {
		return err
	}
	var bad []CorruptRecord
	var fields infoFields
	err = t.use(ctx, false, func(tx engineTx) error {
		var host string
		if sx, ok := tx.(scopedTx); ok {
			host, _ = sx.scopeHost()
		}
		return tx.scan(ctx, func(name string, r *record, err error) error {
			if err == nil {
				err = unreachableName(name, tx.maxName())
			}
			if err != nil {
				bad = append(bad, CorruptRecord{Name: name, Err: err})
				return nil
			}
			fields.info = r.info(name)
			if !filter.Match(&fields) {
				return nil
			}
			rec := Record{
				Name: name, ID: formatID(r.ID), Kind: r.Kind, Parent: r.Parent,
				Labels: r.Labels, Created: r.Created, Updated: r.Updated, Usage: r.Usage,
				Host: host, Content: r.Content,
			}
			if err := fn(rec); err != nil {
				return callerError{err}
			}
			// A callback may end the transaction; the engine cannot go on.
			if t.done.Load() {
				return ErrTransactionDone
			}
			return nil
		})
	})
	if err != nil {
		return err
	}
	if len(bad) > 0 {
		return &CorruptRecordsError{Records: bad}
	}
	return nil
}

// CorruptRecord is a stored record Walk could not hand over.
type CorruptRecord struct {
	// Name is the name the record is stored under.
	Name string
	// Err says what is wrong with it; it wraps ErrCorrupt.
	Err error
}

// CorruptRecordsError is Walk's report of the records it passed over, in
// name order. errors.Is(err, ErrCorrupt) holds for it, so its class is
// DataLoss.
type CorruptRecordsError struct {
	Records []CorruptRecord
}

func (e *CorruptRecordsError) Error() string {
	parts := make([]string, len(e.Records))
	for i, r := range e.Records {
		parts[i] = fmt.Sprintf("snapshot %q: %v", r.Name, r.Err)
	}
	return fmt.Sprintf("%d record(s) cannot be read: %s", len(e.Records), strings.Join(parts, "; "))
}

// Unwrap returns ErrCorrupt and each record's error.
func (e *CorruptRecordsError) Unwrap() []error {
	errs := []error{ErrCorrupt}
	for _, r := range e.Records {
		errs = append(errs, r.Err)
	}
	return errs
}

// ValidateFilters reports, with InvalidArgument, a filter WalkInfo and Walk
// would refuse: one that does not parse, or whose regular expression (~=)
// does not compile. containerd's filters compile a regular expression only
// when they first match, and then log the error and match nothing, so a
// mistyped one would silently list nothing; this package refuses it before
// reading anything. nil means every filter will be applied as written.
func ValidateFilters(fs ...string) error {
	_, err := parseFilters(fs...)
	return err
}

// parseFilters parses fs as WalkInfo applies them and compiles every regular
// expression they hold.
func parseFilters(fs ...string) (filters.Filter, error) {
	filter, err := filters.ParseAll(fs...)
	if err != nil {
		return nil, err
	}
	if err := checkRegexps(filter); err != nil {
		return nil, fmt.Errorf("filters %q: %w", fs, err)
	}
	return filter, nil
}

// checkRegexps compiles the regular expression of every ~= selector in the
// parsed tree f. containerd exports the tree's inner nodes (Any, All) but
// not its leaves, whose operator and value are read by reflection (values
// of unexported fields can be read, not called); a leaf of another shape is
// passed over, and TestFiltersRefuseBadRegexp fails on a containerd release
// that changes the shape.
func checkRegexps(f filters.Filter) error {
	switch f := f.(type) {
	case filters.Any:
		for _, sub := range f {
			if err := checkRegexps(sub); err != nil {
				return err
			}
		}
		return nil
	case filters.All:
		for _, sub := range f {
			if err := checkRegexps(sub); err != nil {
				return err
			}
		}
		return nil
	}
	v := reflect.ValueOf(f)
	if v.Kind() != reflect.Struct {
		return nil
	}
	op, value := v.FieldByName("operator"), v.FieldByName("value")
	// operatorMatches is the fourth operator (?, ==, !=, ~=).
	const operatorMatches = 3
	if !op.IsValid() || op.Kind() != reflect.Int || op.Int() != operatorMatches ||
		!value.IsValid() || value.Kind() != reflect.String {
		return nil
	}
	if _, err := regexp.Compile(value.String()); err != nil {
		var re *syntax.Error
		if errors.As(err, &re) {
			err = fmt.Errorf("%s in %q", re.Code, re.Expr)
		}
		return fmt.Errorf("invalid regular expression after ~=: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	return nil
}
