package storage

import (
	"cmp"
	"context"
	"fmt"
	"slices"

	"github.com/containerd/containerd/v2/core/snapshots"
)

// Check's bounds on its memory (see Check); variables so that tests can
// shrink them.
var (
	// checkBatch is how many records (or index entries) Check judges
	// together: what they need is read for all of them at once.
	checkBatch = 128
	// nearCap bounds the records a batch keeps looked up: its parents and
	// their ancestors. Lookups past it are read again when needed.
	nearCap = 1 << 13
	// reachCap bounds the verdicts Check keeps on whether a record's
	// parents lead to a base, and the path one walk settles: enough for a
	// chain of 65,536 to be walked once.
	reachCap = 1 << 16
	// idRunLen is how many IDs Check sorts in memory at once (2 MiB); a
	// store with more spills them to a temporary file in sorted runs.
	idRunLen = 1 << 18
)

// checkReader is how Check reads a store without holding it: many
// records or index entries in as few round trips as the engine allows,
// none of them noted among the transaction's reads (Check's transaction
// never commits, so nothing needs guarding).
type checkReader interface {
	// readRecords calls fn for each of names with its record decoded as
	// the scan decodes it (a bbolt chain piece as stored, and what the
	// scan cannot decode an error here too): nil when there is none.
	readRecords(ctx context.Context, names []string, fn func(i int, r *record, decodeErr error)) error
	// indexedParent returns the parts of a parent that the engine keys
	// its children index by, as scanLinks gives them.
	indexedParent(name string, id uint64) ref
	// readLinks calls fn for each of links with the children-index entry
	// link(l.parent, l.child) would write: keyed is its parent as
	// scanLinks gives it (the parts the engine keys by), child the name
	// stored there, found false when there is none.
	readLinks(ctx context.Context, links []link, fn func(i int, keyed ref, child string, found bool)) error
}

// scopeChecker checks the records and children index of one scope in
// memory that does not follow the number of records (see Check). Its
// batch and looked-up records serve the index's passes too.
type scopeChecker struct {
	tx      engineTx
	maxName int
	limit   uint64
	ids     idSpill
	reach   reachCache
	batch   []namedRecord
	links   []link
	near    map[string]*record // looked up for the batch; nil: absent
	index   indexCheck

	// The problems, in the groups Check lists them in.
	unreadable []Problem // records that do not decode, or that no lookup reaches
	badLinks   []Problem // index entries that do not decode
	judged     []judgedProblem
	linkIssues []Problem // index entries no record has
	missing    []Problem // records missing from the index
}

type namedRecord struct {
	name string
	r    record
}

// checkable reports whether Check judges a record the scan reported:
// one that decodes, under a name lookups reach (addRecord reports the
// others).
func checkable(name string, decodeErr error, maxName int) bool {
	return decodeErr == nil && unreachableName(name, maxName) == nil
}

// checkCopy is what Check keeps of a record the engine lent it: all but
// the labels, which no rule reads.
func checkCopy(r *record) record {
	kept := *r
	kept.Labels = nil
	return kept
}

// judgedProblem is a problem of one record, ranked by the rule that found
// it, so that a record's problems are listed in the order of the rules.
type judgedProblem struct {
	rank int
	Problem
}

const (
	rankKind = iota
	rankSharedID
	rankIDLimit
	rankParent
)

// checkScope checks every record of tx's scope, and its children index.
func checkScope(ctx context.Context, tx engineTx, limit uint64) ([]Problem, error) {
	c := &scopeChecker{tx: tx, maxName: tx.maxName(), limit: limit, near: map[string]*record{}, index: newIndexCheck()}
	defer c.ids.close()
	if err := tx.scan(ctx, c.addRecord(ctx)); err != nil {
		return nil, err
	}
	if err := c.judgeBatch(ctx); err != nil {
		return nil, err
	}
	if err := c.checkIndex(ctx); err != nil {
		return nil, err
	}
	if err := c.checkSharedIDs(ctx); err != nil {
		return nil, err
	}
	// A damaged bbolt page can make the scan report a name twice; its
	// problems are then listed once, as for any record.
	slices.SortStableFunc(c.judged, func(a, b judgedProblem) int {
		return cmp.Or(cmp.Compare(a.Snapshot, b.Snapshot), cmp.Compare(a.rank, b.rank))
	})
	c.judged = slices.Compact(c.judged)
	slices.SortStableFunc(c.missing, func(a, b Problem) int { return cmp.Compare(a.Snapshot, b.Snapshot) })
	c.missing = slices.Compact(c.missing)
	found := slices.Concat(c.unreadable, c.badLinks)
	for _, p := range c.judged {
		found = append(found, p.Problem)
	}
	return slices.Concat(found, c.linkIssues, c.missing), nil
}

func (c *scopeChecker) judgef(name string, rank int, format string, args ...any) {
	c.judged = append(c.judged, judgedProblem{rank, Problem{Snapshot: name, Detail: fmt.Sprintf(format, args...)}})
}

// addRecord returns the scan's callback: it keeps each record for its
// batch, judged when the batch is full.
func (c *scopeChecker) addRecord(ctx context.Context) func(string, *record, error) error {
	return func(name string, r *record, decodeErr error) error {
		if decodeErr != nil {
			c.unreadable = append(c.unreadable, Problem{Snapshot: name, Detail: fmt.Sprintf("record does not decode: %v", decodeErr)})
			return nil
		}
		if err := unreachableName(name, c.maxName); err != nil {
			c.unreadable = append(c.unreadable, Problem{Snapshot: name, Detail: fmt.Sprintf("no lookup reaches the record: %v", err)})
			return nil
		}
		if err := c.ids.add(r.ID); err != nil {
			return err
		}
		c.batch = append(c.batch, namedRecord{name, checkCopy(r)})
		if len(c.batch) < checkBatch {
			return nil
		}
		return c.judgeBatch(ctx)
	}
}

// judgeBatch judges the records of the batch, each on its own and against
// its parent, and adds the entry each should have in the children index
// to what checkIndex compares the index with.
func (c *scopeChecker) judgeBatch(ctx context.Context) error {
	defer func() {
		c.batch = c.batch[:0]
		clear(c.near)
	}()
	// A batch's own records answer lookups too: in name order, children
	// often follow their parents closely.
	parents := make([]string, 0, len(c.batch))
	for i := range c.batch {
		c.near[c.batch[i].name] = &c.batch[i].r
	}
	for _, n := range c.batch {
		if n.r.Parent != "" {
			parents = append(parents, n.r.Parent)
		}
	}
	if err := c.readAncestors(ctx, parents); err != nil {
		return err
	}
	for i := range c.batch {
		n := &c.batch[i]
		if err := c.judge(ctx, n.name, &n.r); err != nil {
			return err
		}
		if n.r.Parent == "" {
			continue
		}
		p, err := c.lookup(ctx, n.r.Parent)
		if err != nil {
			return err
		}
		if p != nil {
			c.index.want(c.tx.indexedParent(n.r.Parent, p.ID), n.r.ID, n.name)
		}
	}
	return nil
}

// judge applies the rules of one record and its parent.
func (c *scopeChecker) judge(ctx context.Context, name string, r *record) error {
	switch r.Kind {
	case snapshots.KindActive, snapshots.KindView, snapshots.KindCommitted:
	default:
		c.judgef(name, rankKind, "unknown kind %d", int(r.Kind))
	}
	if r.ID == 0 || r.ID > c.limit {
		c.judgef(name, rankIDLimit, "ID %d is outside what the allocator handed out (1..%d) and could be handed out again", r.ID, c.limit)
	}
	if r.Parent == "" {
		if len(r.ParentIDs) > 0 || r.ChainFrom != "" {
			c.judgef(name, rankParent, "has no parent but stores parent chain %v", r.ParentIDs)
		}
		return nil
	}
	p, err := c.lookup(ctx, r.Parent)
	if err != nil || p == nil {
		if p == nil && err == nil {
			c.judgef(name, rankParent, "parent %q does not exist", r.Parent)
		}
		return err
	}
	if p.Kind != snapshots.KindCommitted {
		c.judgef(name, rankParent, "parent %q is %s, not committed", r.Parent, kindName(p.Kind))
	}
	ok, err := c.followable(ctx, name, r)
	if err != nil {
		return err
	}
	if !ok {
		c.judgef(name, rankParent, "parent chain cannot be followed (a parent is missing or the chain loops)")
		return nil
	}
	problem, err := c.chainProblem(ctx, r, p)
	if problem != "" {
		c.judgef(name, rankParent, "%s", problem)
	}
	return err
}

// lookup returns the record of name as Check judges it: nil when there is
// none, when it does not decode, or when no lookup reaches it.
func (c *scopeChecker) lookup(ctx context.Context, name string) (*record, error) {
	if r, ok := c.near[name]; ok {
		return r, nil
	}
	if err := c.read(ctx, []string{name}); err != nil {
		return nil, err
	}
	r := c.near[name]
	if len(c.near) > nearCap {
		delete(c.near, name)
	}
	return r, nil
}

// read looks up the names not looked up yet, at once, into near.
func (c *scopeChecker) read(ctx context.Context, names []string) error {
	var ask []string
	for _, n := range names {
		if _, ok := c.near[n]; ok {
			continue
		}
		if unreachableName(n, c.maxName) != nil {
			c.near[n] = nil
			continue
		}
		c.near[n] = nil // asked once, even when names holds it twice
		ask = append(ask, n)
	}
	return c.tx.readRecords(ctx, ask, func(i int, r *record, decodeErr error) {
		if r != nil && decodeErr == nil {
			kept := checkCopy(r)
			c.near[ask[i]] = &kept
		}
	})
}

// readAncestors looks up names, then their parents, and so on, a level at
// a time, until a verdict on following them is known (see followable) or
// nearCap is reached: on etcd a chain costs a round trip per level for the
// whole batch, not per record.
func (c *scopeChecker) readAncestors(ctx context.Context, names []string) error {
	for len(names) > 0 && len(c.near) < nearCap {
		if err := c.read(ctx, names); err != nil {
			return err
		}
		var next []string
		for _, n := range names {
			r := c.near[n]
			if r == nil || r.Parent == "" {
				continue
			}
			if _, known := c.reach[r.Parent]; known {
				continue
			}
			if _, read := c.near[r.Parent]; !read {
				next = append(next, r.Parent)
			}
		}
		names = next
	}
	return nil
}

// chainProblem judges the stored chain of r against its parent p, whose
// own chain is judged with p: a whole chain must be p's ID then p's chain;
// a piece must be p's ID then p's piece, going on from the same ancestor,
// or p's ID alone, going on from p. A record without a stored chain
// (containerd's) is followed, which followable has judged.
func (c *scopeChecker) chainProblem(ctx context.Context, r, p *record) (string, error) {
	switch {
	case r.ChainFrom != "":
		switch {
		case len(r.ParentIDs) == 0 || len(r.ParentIDs) > boltChainPiece:
			return fmt.Sprintf("stores a chain piece of %d IDs, not 1 to %d", len(r.ParentIDs), boltChainPiece), nil
		case r.ParentIDs[0] != p.ID:
			return fmt.Sprintf("stored parent chain begins with %d, not its parent's ID %d", r.ParentIDs[0], p.ID), nil
		case r.ChainFrom == r.Parent:
			if len(r.ParentIDs) != 1 {
				return fmt.Sprintf("stored chain piece %v goes on from its parent, so holds only the parent's ID", r.ParentIDs), nil
			}
		case p.ChainFrom != r.ChainFrom || !slices.Equal(r.ParentIDs[1:], p.ParentIDs):
			return fmt.Sprintf("stored chain piece %v (going on from %q) is not its parent's ID and piece %v (going on from %q)", r.ParentIDs, r.ChainFrom, p.ParentIDs, p.ChainFrom), nil
		}
	case len(r.ParentIDs) > 0:
		chain, err := c.chainOf(ctx, p)
		if err != nil {
			return "", err
		}
		want := append([]uint64{p.ID}, chain...)
		if !slices.Equal(r.ParentIDs, want) {
			// No stored chain is fine: containerd's records have none.
			return fmt.Sprintf("stored parent chain %v differs from the followed chain %v", r.ParentIDs, want), nil
		}
	}
	return "", nil
}

// chainOf returns the whole chain of a followable record: stored whole,
// put together from its pieces, or followed.
func (c *scopeChecker) chainOf(ctx context.Context, r *record) ([]uint64, error) {
	if r.ChainFrom == "" && (len(r.ParentIDs) > 0 || r.Parent == "") {
		return r.ParentIDs, nil
	}
	var chain []uint64
	if r.ChainFrom != "" {
		chain = slices.Clone(r.ParentIDs)
		seen := map[string]bool{}
		for from := r.ChainFrom; from != "" && !seen[from]; {
			seen[from] = true
			a, err := c.lookup(ctx, from)
			if a == nil || err != nil {
				return nil, err
			}
			chain = append(chain, a.ParentIDs...)
			from = a.ChainFrom
		}
		return chain, nil
	}
	// Followed by name: followable has found that the parents end.
	for r.Parent != "" {
		p, err := c.lookup(ctx, r.Parent)
		if p == nil || err != nil {
			return nil, err
		}
		chain = append(chain, p.ID)
		r = p
	}
	return chain, nil
}

// checkSharedIDs reports the IDs that more than one record holds, except
// among the bindings of one shared layer. Only when there are some does it
// read the records again, for their names.
func (c *scopeChecker) checkSharedIDs(ctx context.Context) error {
	shared, err := c.ids.shared()
	if err != nil || len(shared) == 0 {
		return err
	}
	type owner struct{ name, content string }
	owners := make(map[uint64][]owner, len(shared))
	for _, id := range shared {
		owners[id] = nil
	}
	err = c.tx.scan(ctx, func(name string, r *record, decodeErr error) error {
		if !checkable(name, decodeErr, c.maxName) {
			return nil
		}
		if held, ok := owners[r.ID]; ok {
			owners[r.ID] = append(held, owner{name, r.Content})
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, id := range shared {
		held := owners[id]
		oneLayer := true
		for _, o := range held {
			oneLayer = oneLayer && o.content != "" && o.content == held[0].content
		}
		if oneLayer {
			continue
		}
		others := make([]string, 0, len(held)-1)
		for _, o := range held[1:] {
			others = append(others, o.name)
		}
		c.judgef(held[0].name, rankSharedID, "ID %d is shared with %q", id, others)
	}
	return nil
}
