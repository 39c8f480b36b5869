package main

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestSayClassOnce(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{`snapshot "x" does not exist: not found`, `snapshot "x" does not exist`},
		{`bad "kind": corrupt snapshot metadata: data loss`, `bad "kind": corrupt snapshot metadata`},
		{`snapshot "a" exists (identical; use --skip-existing): already exists (0 imported before this)`, `snapshot "a" exists (identical; use --skip-existing) (0 imported before this)`},
		// The class is kept where nothing else says it.
		{`cannot remove snapshot "a" with child: failed precondition`, `cannot remove snapshot "a" with child: failed precondition`},
		{`missing parent "ghost": not found; other: data loss`, `missing parent "ghost"; other: data loss`},
		{`x: not foundling`, `x: not foundling`},
	} {
		assert.Equal(t, tc.want, sayClassOnce(tc.in), tc.in)
	}
}

// TestErrorsSayClassOnce: the tool's errors name their class once.
func TestErrorsSayClassOnce(t *testing.T) {
	path := boltFixture(t)
	r := exe(t, "info", "nope", "--store", path)
	assert.Equal(t, 1, r.code)
	assert.Equal(t, "snapmeta: snapshot \"nope\" does not exist\n", r.stderr)
}
