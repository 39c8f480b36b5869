package storage

import (
	"context"
	"fmt"
)

// Problem is one broken invariant found by Check.
type Problem struct {
	// Host is the host scope of the snapshot concerned, on a host-scoped
	// root (see WithHost); empty otherwise.
	Host string
	// Snapshot names the snapshot concerned; it is empty for a problem of
	// the store as a whole.
	Snapshot string
	// Detail says what is wrong.
	Detail string
	// Page is set for damage to the engine's file below the records (on
	// bbolt: a page or the freelist, as bbolt's own consistency check finds
	// it, or a page that cannot be read at all), kept apart from the
	// snapshot invariants; Snapshot is then empty, and String begins with
	// "page damage: ". Such a store is repaired by copying what can still
	// be read ('snapmeta salvage'), not by fixing records.
	Page bool
}

func (p Problem) String() string {
	if p.Page {
		return "page damage: " + p.Detail
	}
	var where string
	if p.Host != "" {
		where = fmt.Sprintf("host %q: ", p.Host)
	}
	if p.Snapshot == "" {
		return where + p.Detail
	}
	return fmt.Sprintf("%ssnapshot %q: %s", where, p.Snapshot, p.Detail)
}

// Check verifies every invariant of the store in one read-only transaction
// and returns each problem found, in a stable order (none: nil):
//
//   - the engine's file is sound below the records (on bbolt: bbolt's own
//     check of pages and freelist; see Problem.Page). When a page cannot
//     be read at all, that is reported and the records are not judged;
//   - the engine's layout is sound (when it is not, that is the one problem
//     reported: the records cannot be judged);
//   - every record decodes, under a name lookups reach;
//   - every snapshot's parent exists and is committed;
//   - the children index holds exactly the parent links of the records,
//     each under the one key the engine writes for it;
//   - IDs are unique, and none is above what the ID allocator has handed out;
//   - every stored parent chain equals the chain found by following parents.
//
// On a host-scoped root (a store opened WithHost or WithHostView) it
// checks every host's scope so, whichever host the store is of, and the
// root as a whole: IDs are unique across scopes except among the bindings
// of one shared layer; every binding is counted among its layer's
// references and every reference is a binding of that layer, with the
// layer's chain; the content index holds exactly one entry per layer; no
// record lies outside the scopes.
//
// The error is for a store that cannot be read at all, a temporary file
// that cannot be made, written or read back (classed by the operating
// system's answer: NotFound, PermissionDenied, ResourceExhausted for a
// full disk, else Internal), or a MetaStore not made by this package
// (class NotImplemented).
//
// Check reads the store as it judges it, so that its memory does not
// follow the number of records. It judges the records in batches of 128 in
// the scan's order, reading what each needs (its parent, and the parents
// on to the first whose verdict it knows) at once for the batch: on etcd
// in Txns of at most the store's WithMaxTxnOps Gets and 1 MiB of keys. It
// compares the children index with the records' links by a digest of
// each side (sums of two keyed 64-bit hashes, seeded afresh for each
// Check: equal digests mean equal sets but for a negligible chance); only
// when they differ does it scan the records again, each looking up its
// own entry, and, unless every entry was found so, read the index again
// to judge its entries. It finds
// shared IDs by sorting them in runs of 262,144 (2 MiB), written to a
// temporary file under os.TempDir() (removed when Check returns) whenever
// a run fills; when some ID is shared, the records are scanned once more
// for the names that hold it. What it holds: the batch and up to about
// 8,192 records read for it, each with its stored chain; verdicts on up to
// 65,536 records, and as many names on one walk of parents; 4 KiB of
// buffer per spilled run; the names of records that share an ID; and the
// problems found. What grows with the store besides: on bbolt, bbolt's own
// page check (tx.Check) holds an entry per page of the file; on a
// host-scoped root, Check holds every record of every scope, labels left
// out, to judge the scopes together. A chain deeper than 65,536 costs
// walks again once the verdicts are dropped: lookups in the square of its
// depth over 131,072.
func Check(ctx context.Context, ms MetaStore) ([]Problem, error) {
	tctx, tr, err := ms.TransactionContext(ctx, false)
	if err != nil {
		return nil, err
	}
	defer tr.Rollback()
	t, err := ownTransaction(tctx)
	if err != nil {
		return nil, err
	}
	var problems []Problem
	err = t.use(tctx, false, func(tx engineTx) error {
		var pages []Problem
		if pc, ok := tx.(pageChecker); ok {
			found, err := pc.checkPages()
			for _, d := range found {
				pages = append(pages, Problem{Page: true, Detail: d})
			}
			if err != nil {
				problems = append(pages, Problem{Page: true, Detail: err.Error()})
				return nil
			}
		}
		if err := tx.layoutDamage(); err != nil {
			problems = append(pages, Problem{Detail: fmt.Sprintf("the store's layout is damaged: %v", err)})
			return nil
		}
		limit, err := tx.idLimit(tctx)
		if err != nil {
			return err
		}
		var found []Problem
		if sx, ok := tx.(scopedTx); ok {
			if _, ok := sx.scopeHost(); ok {
				found, err = checkHostScopes(tctx, sx, limit)
				problems = append(pages, found...)
				return err
			}
		}
		found, err = checkScope(tctx, tx, limit)
		problems = append(pages, found...)
		return err
	})
	if err != nil {
		return nil, err
	}
	return problems, nil
}

// pageChecker is an engine transaction that can check its file below the
// records (bbolt).
type pageChecker interface {
	// checkPages returns each damage found; the error is for pages that
	// cannot be read at all (ErrDamaged).
	checkPages() ([]string, error)
}
