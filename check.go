package storage

import (
	"context"
	"fmt"
	"slices"

	"github.com/containerd/containerd/v2/core/snapshots"
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
// The error is for a store that cannot be read at all, or a MetaStore not
// made by this package (class NotImplemented). Check holds every record in
// memory, labels left out: some hundreds of bytes per snapshot (at a
// million snapshots, about 530 live on bbolt and 670 on etcd).
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
		c := checker{records: map[string]*record{}, byID: map[uint64][]string{}, maxName: tx.maxName()}
		if pc, ok := tx.(pageChecker); ok {
			found, err := pc.checkPages()
			for _, d := range found {
				c.found = append(c.found, Problem{Page: true, Detail: d})
			}
			if err != nil {
				c.found = append(c.found, Problem{Page: true, Detail: err.Error()})
				problems = c.found
				return nil
			}
		}
		if err := tx.layoutDamage(); err != nil {
			c.report("", "the store's layout is damaged: %v", err)
			problems = c.found
			return nil
		}
		limit, err := tx.idLimit(tctx)
		if err != nil {
			return err
		}
		if sx, ok := tx.(scopedTx); ok {
			if _, ok := sx.scopeHost(); ok {
				problems, err = checkHostScopes(tctx, sx, limit)
				return err
			}
		}
		if err := c.read(tctx, tx); err != nil {
			return err
		}
		problems = c.problems(limit)
		return nil
	})
	if err != nil {
		return nil, err
	}
	return problems, nil
}

// read reads the records and the children index of tx's scope.
func (c *checker) read(ctx context.Context, tx engineTx) error {
	if err := tx.scan(ctx, c.addRecord); err != nil {
		return err
	}
	return tx.scanLinks(ctx, c.addLink)
}

// pageChecker is an engine transaction that can check its file below the
// records (bbolt).
type pageChecker interface {
	// checkPages returns each damage found; the error is for pages that
	// cannot be read at all (ErrDamaged).
	checkPages() ([]string, error)
}

// checker gathers what Check reads and judges it afterwards.
type checker struct {
	maxName int // the engine's
	records map[string]*record
	byID    map[uint64][]string
	links   []link
	found   []Problem
	reach   map[string]int // followable's verdicts
}

type link struct{ parent, child ref }

func (c *checker) report(name, format string, args ...any) {
	c.found = append(c.found, Problem{Snapshot: name, Detail: fmt.Sprintf(format, args...)})
}

func (c *checker) addRecord(name string, r *record, decodeErr error) error {
	if decodeErr != nil {
		c.report(name, "record does not decode: %v", decodeErr)
		return nil
	}
	if err := unreachableName(name, c.maxName); err != nil {
		c.report(name, "no lookup reaches the record: %v", err)
		return nil
	}
	kept := *r        // r is the scan's
	kept.Labels = nil // not needed; keep memory small
	c.records[name] = &kept
	c.byID[r.ID] = append(c.byID[r.ID], name)
	return nil
}

func (c *checker) addLink(parent, child ref, decodeErr error) error {
	if decodeErr != nil {
		c.report(child.name, "children index entry does not decode: %v", decodeErr)
		return nil
	}
	c.links = append(c.links, link{parent, child})
	return nil
}

func (c *checker) problems(idLimit uint64) []Problem {
	names := slices.Sorted(func(yield func(string) bool) {
		for n := range c.records {
			if !yield(n) {
				return
			}
		}
	})
	for _, name := range names {
		r := c.records[name]
		switch r.Kind {
		case snapshots.KindActive, snapshots.KindView, snapshots.KindCommitted:
		default:
			c.report(name, "unknown kind %d", int(r.Kind))
		}
		if owners := c.byID[r.ID]; len(owners) > 1 && owners[0] == name && !c.bindingsOfOneLayer(owners) {
			c.report(name, "ID %d is shared with %q", r.ID, owners[1:])
		}
		if r.ID == 0 || r.ID > idLimit {
			c.report(name, "ID %d is outside what the allocator handed out (1..%d) and could be handed out again", r.ID, idLimit)
		}
		c.checkParent(name, r)
	}
	c.checkLinks()
	return c.found
}

// bindingsOfOneLayer reports whether the records of names are all
// bindings of one shared layer, which may share an ID.
func (c *checker) bindingsOfOneLayer(names []string) bool {
	for _, n := range names {
		if r := c.records[n]; r.Content == "" || r.Content != c.records[names[0]].Content {
			return false
		}
	}
	return true
}

func (c *checker) checkParent(name string, r *record) {
	if r.Parent == "" {
		if len(r.ParentIDs) > 0 || r.ChainFrom != "" {
			c.report(name, "has no parent but stores parent chain %v", r.ParentIDs)
		}
		return
	}
	p, ok := c.records[r.Parent]
	if !ok {
		c.report(name, "parent %q does not exist", r.Parent)
		return
	}
	if p.Kind != snapshots.KindCommitted {
		c.report(name, "parent %q is %s, not committed", r.Parent, kindName(p.Kind))
	}
	if !c.followable(name) {
		c.report(name, "parent chain cannot be followed (a parent is missing or the chain loops)")
		return
	}
	if problem := c.chainProblem(r, p); problem != "" {
		c.report(name, "%s", problem)
	}
}

// Whether the parents of a record can be followed to a base, found once
// per record.
const (
	reachUnknown = iota
	reachVisiting
	reachOK
	reachBad
)

// followable reports whether the parents of name lead to a base, without
// a missing parent or a loop; every record on the way is judged too, so
// the whole store costs one pass.
func (c *checker) followable(name string) bool {
	if c.reach == nil {
		c.reach = map[string]int{}
	}
	var path []string
	settle := func(state int) bool {
		for _, n := range path {
			c.reach[n] = state
		}
		return state == reachOK
	}
	for cur := name; ; {
		switch c.reach[cur] {
		case reachOK:
			return settle(reachOK)
		case reachVisiting, reachBad:
			return settle(reachBad)
		}
		r, ok := c.records[cur]
		if !ok {
			return settle(reachBad)
		}
		c.reach[cur] = reachVisiting
		path = append(path, cur)
		if r.Parent == "" {
			return settle(reachOK)
		}
		cur = r.Parent
	}
}

// chainProblem judges the stored chain of r against its parent p, whose
// own chain is judged with p: a whole chain must be p's ID then p's chain;
// a piece must be p's ID then p's piece, going on from the same ancestor,
// or p's ID alone, going on from p. A record without a stored chain
// (containerd's) is followed, which followable has judged.
func (c *checker) chainProblem(r, p *record) string {
	switch {
	case r.ChainFrom != "":
		switch {
		case len(r.ParentIDs) == 0 || len(r.ParentIDs) > boltChainPiece:
			return fmt.Sprintf("stores a chain piece of %d IDs, not 1 to %d", len(r.ParentIDs), boltChainPiece)
		case r.ParentIDs[0] != p.ID:
			return fmt.Sprintf("stored parent chain begins with %d, not its parent's ID %d", r.ParentIDs[0], p.ID)
		case r.ChainFrom == r.Parent:
			if len(r.ParentIDs) != 1 {
				return fmt.Sprintf("stored chain piece %v goes on from its parent, so holds only the parent's ID", r.ParentIDs)
			}
		case p.ChainFrom != r.ChainFrom || !slices.Equal(r.ParentIDs[1:], p.ParentIDs):
			return fmt.Sprintf("stored chain piece %v (going on from %q) is not its parent's ID and piece %v (going on from %q)", r.ParentIDs, r.ChainFrom, p.ParentIDs, p.ChainFrom)
		}
	case len(r.ParentIDs) > 0:
		want := append([]uint64{p.ID}, c.chainOf(p)...)
		if !slices.Equal(r.ParentIDs, want) {
			// No stored chain is fine: containerd's records have none.
			return fmt.Sprintf("stored parent chain %v differs from the followed chain %v", r.ParentIDs, want)
		}
	}
	return ""
}

// chainOf returns the whole chain of a followable record: stored whole,
// put together from its pieces, or followed.
func (c *checker) chainOf(r *record) []uint64 {
	if r.ChainFrom == "" && (len(r.ParentIDs) > 0 || r.Parent == "") {
		return r.ParentIDs
	}
	if r.ChainFrom != "" {
		chain := slices.Clone(r.ParentIDs)
		seen := map[string]bool{}
		for from := r.ChainFrom; from != "" && !seen[from]; {
			seen[from] = true
			a, ok := c.records[from]
			if !ok {
				return nil
			}
			chain = append(chain, a.ParentIDs...)
			from = a.ChainFrom
		}
		return chain
	}
	chain, _ := c.follow(r)
	return chain
}

// follow walks the parents of r by name.
func (c *checker) follow(r *record) ([]uint64, bool) {
	var chain []uint64
	for r.Parent != "" {
		p, ok := c.records[r.Parent]
		if !ok || len(chain) > len(c.records) {
			return nil, false
		}
		chain = append(chain, p.ID)
		r = p
	}
	return chain, true
}

// checkLinks compares the children index with the parent links of the
// records, matching each index entry by the parts the engine keys it by.
func (c *checker) checkLinks() {
	type key struct {
		parentName string
		parentID   uint64
		child      uint64
	}
	want := map[key]string{} // -> child name
	byName := false
	for _, l := range c.links {
		byName = byName || l.parent.name != ""
	}
	for name, r := range c.records {
		p, ok := c.records[r.Parent]
		if r.Parent == "" || !ok {
			continue
		}
		k := key{parentID: p.ID, child: r.ID}
		if byName {
			k = key{parentName: r.Parent, child: r.ID}
		}
		want[k] = name
	}
	for _, l := range c.links {
		k := key{parentName: l.parent.name, parentID: l.parent.id, child: l.child.id}
		name, ok := want[k]
		switch {
		case !ok:
			c.report(l.child.name, "children index links it (ID %d) to parent %s, but no record has that parent link", l.child.id, describeRef(l.parent))
		case name != l.child.name:
			c.report(name, "children index names the child %q", l.child.name)
		}
		delete(want, k)
	}
	for _, name := range slices.Sorted(func(yield func(string) bool) {
		for _, n := range want {
			if !yield(n) {
				return
			}
		}
	}) {
		c.report(name, "missing from the children index of its parent %q", c.records[name].Parent)
	}
}

func describeRef(r ref) string {
	if r.name != "" {
		return fmt.Sprintf("%q", r.name)
	}
	return fmt.Sprintf("ID %d", r.id)
}
