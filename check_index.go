package storage

import (
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"hash/maphash"
	"slices"
)

// link is an entry of the children index: child has parent.
type link struct{ parent, child ref }

// indexCheck compares the children index with the entries the records
// should have, without holding either: each side is summed into an
// order-independent digest, the sum of two 64-bit keyed hashes of its
// entries, seeded at random for each Check so that no store can be made to
// collide on purpose. Equal digests mean equal sets but for a negligible
// chance (both keyed sums colliding); only when they differ are the
// records and the index read again to find which entries differ.
type indexCheck struct {
	seeds   [2]maphash.Seed
	wanted  indexDigest // the entries the records should have
	matched indexDigest // the entries found under the name of their record
	// namesOther holds, by entry, the problems of the records whose entry
	// names another child, until the index is read again.
	namesOther map[link][]Problem
	buf        []byte
}

type indexDigest struct {
	sum [2]uint64
	n   int
}

func newIndexCheck() indexCheck {
	return indexCheck{seeds: [2]maphash.Seed{maphash.MakeSeed(), maphash.MakeSeed()}, namesOther: map[link][]Problem{}}
}

// want adds the entry a record with that parent link should have.
func (ic *indexCheck) want(parent ref, child uint64, childName string) {
	ic.add(&ic.wanted, parent, child, childName)
}

// add sums an entry, encoded without ambiguity, into d.
func (ic *indexCheck) add(d *indexDigest, parent ref, child uint64, childName string) {
	b := binary.AppendUvarint(ic.buf[:0], uint64(len(parent.name)))
	b = append(b, parent.name...)
	b = binary.BigEndian.AppendUint64(b, parent.id)
	b = binary.BigEndian.AppendUint64(b, child)
	b = append(b, childName...)
	for i, seed := range ic.seeds {
		d.sum[i] += maphash.Bytes(seed, b)
	}
	d.n++
	ic.buf = b
}

// checkIndex compares the children index with the records' parent links.
// The index is read once; when it holds exactly the entries the records
// should have, that is all. Otherwise the records are read again and each
// looks up its own entry (findIndexGaps); unless every entry of the index
// was found so, the index is read again and each entry judged: which
// record, if any, has it as its parent link.
func (c *scopeChecker) checkIndex(ctx context.Context) error {
	var held indexDigest
	err := c.tx.scanLinks(ctx, func(parent, child ref, decodeErr error) error {
		if decodeErr != nil {
			c.badLinks = append(c.badLinks, Problem{Snapshot: child.name, Detail: fmt.Sprintf("children index entry does not decode: %v", decodeErr)})
			return nil
		}
		c.index.add(&held, parent, child.id, child.name)
		return nil
	})
	if err != nil || held == c.index.wanted {
		return err
	}
	if err := c.findIndexGaps(ctx); err != nil {
		return err
	}
	if held == c.index.matched && len(c.index.namesOther) == 0 {
		return nil // every entry is a record's own
	}
	err = c.tx.scanLinks(ctx, func(parent, child ref, decodeErr error) error {
		if decodeErr != nil {
			return nil
		}
		c.links = append(c.links, link{parent, child})
		if len(c.links) < checkBatch {
			return nil
		}
		return c.judgeLinks(ctx)
	})
	if err == nil {
		err = c.judgeLinks(ctx)
	}
	// An entry a record found is one the index holds, so the pass reached
	// it; should the engine disagree, the problem is still reported.
	for _, k := range slices.SortedFunc(func(yield func(link) bool) {
		for k := range c.index.namesOther {
			if !yield(k) {
				return
			}
		}
	}, compareLinks) {
		c.linkIssues = append(c.linkIssues, c.index.namesOther[k]...)
	}
	return err
}

func compareLinks(a, b link) int {
	return cmp.Or(cmp.Compare(a.parent.name, b.parent.name), cmp.Compare(a.parent.id, b.parent.id), cmp.Compare(a.child.id, b.child.id))
}

// findIndexGaps reads the records again, in batches, and looks up the
// entry each one with a parent should have: a record whose entry is
// missing is reported, and one whose entry names another child is kept
// for when judgeLinks reaches that entry.
func (c *scopeChecker) findIndexGaps(ctx context.Context) error {
	err := c.tx.scan(ctx, func(name string, r *record, decodeErr error) error {
		if !checkable(name, decodeErr, c.maxName) || r.Parent == "" {
			return nil
		}
		c.batch = append(c.batch, namedRecord{name, checkCopy(r)})
		if len(c.batch) < checkBatch {
			return nil
		}
		return c.lookUpEntries(ctx)
	})
	if err != nil {
		return err
	}
	return c.lookUpEntries(ctx)
}

// lookUpEntries looks up the entry of each record of the batch.
func (c *scopeChecker) lookUpEntries(ctx context.Context) error {
	defer func() {
		c.batch = c.batch[:0]
		clear(c.near)
	}()
	parents := make([]string, len(c.batch))
	for i, n := range c.batch {
		c.near[n.name] = &c.batch[i].r
		parents[i] = n.r.Parent
	}
	if err := c.read(ctx, parents); err != nil {
		return err
	}
	var entries []link
	for _, n := range c.batch {
		p, err := c.lookup(ctx, n.r.Parent)
		if err != nil {
			return err
		}
		if p != nil {
			entries = append(entries, link{ref{name: n.r.Parent, id: p.ID}, ref{name: n.name, id: n.r.ID}})
		}
	}
	return c.tx.readLinks(ctx, entries, func(i int, keyed ref, child string, found bool) {
		e := entries[i]
		switch {
		case !found:
			c.missing = append(c.missing, Problem{Snapshot: e.child.name, Detail: fmt.Sprintf("missing from the children index of its parent %q", e.parent.name)})
		case child == e.child.name:
			c.index.add(&c.index.matched, keyed, e.child.id, child)
		default:
			k := link{keyed, ref{id: e.child.id}}
			c.index.namesOther[k] = append(c.index.namesOther[k], Problem{Snapshot: e.child.name, Detail: fmt.Sprintf("children index names the child %q", child)})
		}
	})
}

// judgeLinks judges a batch of index entries that not every record found:
// an entry is sound when the child it names has it as its parent link.
func (c *scopeChecker) judgeLinks(ctx context.Context) error {
	defer func() {
		c.links = c.links[:0]
		clear(c.near)
	}()
	children := make([]string, len(c.links))
	for i, l := range c.links {
		children[i] = l.child.name
	}
	if err := c.read(ctx, children); err != nil {
		return err
	}
	var parents []string
	for _, n := range children {
		if r := c.near[n]; r != nil && r.Parent != "" {
			parents = append(parents, r.Parent)
		}
	}
	if err := c.read(ctx, parents); err != nil {
		return err
	}
	for _, l := range c.links {
		k := link{l.parent, ref{id: l.child.id}}
		if ps, ok := c.index.namesOther[k]; ok {
			c.linkIssues = append(c.linkIssues, ps...)
			delete(c.index.namesOther, k)
			continue
		}
		claimed, err := c.claims(ctx, l)
		if err != nil {
			return err
		}
		if !claimed {
			c.linkIssues = append(c.linkIssues, Problem{Snapshot: l.child.name, Detail: fmt.Sprintf("children index links it (ID %d) to parent %s, but no record has that parent link", l.child.id, describeRef(l.parent))})
		}
	}
	return nil
}

// claims reports whether the child l names has l as its parent link.
func (c *scopeChecker) claims(ctx context.Context, l link) (bool, error) {
	r, err := c.lookup(ctx, l.child.name)
	if r == nil || err != nil || r.ID != l.child.id || r.Parent == "" {
		return false, err
	}
	p, err := c.lookup(ctx, r.Parent)
	if p == nil || err != nil {
		return false, err
	}
	return c.tx.indexedParent(r.Parent, p.ID) == l.parent, nil
}

func describeRef(r ref) string {
	if r.name != "" {
		return fmt.Sprintf("%q", r.name)
	}
	return fmt.Sprintf("ID %d", r.id)
}
