package main

import (
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestVersion(t *testing.T) {
	out := ok(t, "version")
	assert.Regexp(t, regexp.MustCompile(`^snapmeta \S+ \((.+, )?go1\.\d+\S*\)\n$`), out)
}

// TestLsOutputs: -q, --no-headers and --format, from flags and from the
// environment (the command line wins).
func TestLsOutputs(t *testing.T) {
	path := boltFixture(t)
	table := ok(t, "ls", "--store", path)
	asJSON := ok(t, "ls", "--store", path, "--json")
	noHeaders := ok(t, "ls", "--store", path, "--no-headers")
	assert.Equal(t, 7, strings.Count(noHeaders, "\n"))
	assert.NotContains(t, noHeaders, "KIND")
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"-q"}, nil, "layer-1\nlayer-2\nlayer-3\nother-2\nscratch\nweb\nweb-view\n"},
		{[]string{"-q", "kind==view"}, nil, "web-view\n"},
		{[]string{"--format", "json"}, nil, asJSON},
		{[]string{"--format", "table"}, nil, table},
		{nil, []string{"SNAPMETA_FORMAT=json"}, asJSON},
		{nil, []string{"SNAPMETA_NO_HEADERS=true"}, noHeaders},
		{[]string{"--format", "table"}, []string{"SNAPMETA_FORMAT=json"}, table},
		{nil, []string{"SNAPMETA_QUIET=1", "SNAPMETA_DIAL_TIMEOUT=2s"}, "layer-1\nlayer-2\nlayer-3\nother-2\nscratch\nweb\nweb-view\n"},
	} {
		t.Run(strings.Join(append(tc.args, tc.env...), "_"), func(t *testing.T) {
			r := snapmeta(t, "", tc.env, append([]string{"ls", "--store", path}, tc.args...)...)
			assert.Equal(t, 0, r.code, r.stderr)
			assert.Equal(t, mask(tc.want), mask(r.stdout))
		})
	}
	for _, tc := range []struct {
		args []string
		env  []string
		want string
	}{
		{[]string{"--format", "yaml"}, nil, `--format must be table, json or a Go template ({{.Name}} ...), not "yaml"`},
		{[]string{"-q", "--json"}, nil, "-q writes names only; it does not go with JSON"},
		{nil, []string{"SNAPMETA_DIAL_TIMEOUT=soon"}, `$SNAPMETA_DIAL_TIMEOUT: invalid argument "soon" for "--dial-timeout" flag`},
		{nil, []string{"SNAPMETA_DIAL_TIMEOUT=0s"}, "--dial-timeout must be positive, not 0s"},
	} {
		t.Run(strings.Join(append(tc.args, tc.env...), "_"), func(t *testing.T) {
			wantFail(t, snapmeta(t, "", tc.env, append([]string{"ls", "--store", path}, tc.args...)...), 2, tc.want)
		})
	}
}
