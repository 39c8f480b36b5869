package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"unicode/utf8"

	"github.com/containerd/containerd/v2/core/snapshots"
	"github.com/snapmeta/storage"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestLsFormatTemplate: --format takes Go templates, one line per
// snapshot or a table under headers made of the field names.
func TestLsFormatTemplate(t *testing.T) {
	path := boltFixture(t)
	for _, tc := range []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"lines", []string{"--format", "{{.Name}} {{.ID}} {{.Kind}}", "kind==committed"}, nil,
			"layer-1 1 committed\nlayer-2 2 committed\nlayer-3 3 committed\nother-2 4 committed\n"},
		{"nested field and size", []string{"--format", "{{.Name}}={{.Usage.Size}} {{size .Usage.Size}}", "name==layer-2"}, nil,
			"layer-2=5243003 5.0 MiB\n"},
		{"labels and json", []string{"--format", `{{index .Labels "a"}} {{json .Labels}}`, "name==layer-3"}, nil,
			`1 {"a":"1","b":"two words"}` + "\n"},
		{"table", []string{"--format", `table {{.Name}}\t{{.Kind}}\t{{.Usage.Size}}`, "kind==committed"}, nil,
			"NAME     KIND       SIZE\nlayer-1  committed  1048576\nlayer-2  committed  5243003\nlayer-3  committed  2048\nother-2  committed  700\n"},
		{"table without headers", []string{"--format", `table {{.Name}}\t{{.Parent}}`, "--no-headers", "name==web"}, nil,
			"web  layer-3\n"},
		{"from the environment", []string{"name==web"}, []string{"SNAPMETA_FORMAT={{.Name}}:{{.Parent}}"}, "web:layer-3\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := snapmeta(t, "", tc.env, append([]string{"ls", "--store", path}, tc.args...)...)
			require.Equal(t, 0, r.code, r.stderr)
			assert.Empty(t, r.stderr)
			assert.Equal(t, tc.want, r.stdout)
		})
	}
	for _, tc := range []struct {
		format string
		want   string
	}{
		{"{{.Name", `--format: template: --format:1: unclosed action`},
		{"{{.Nope}}", `--format: template: --format:1:2: executing "--format" at <.Nope>: can't evaluate field Nope`},
		{"{{nofunc .Name}}", `--format: template: --format:1: function "nofunc" not defined`},
		{"table {{.Name}}\\t{{.Usage.Nope}}", `can't evaluate field Nope`},
		{"names", `--format must be table, json or a Go template ({{.Name}} ...), not "names"`},
	} {
		t.Run(tc.format, func(t *testing.T) {
			wantFail(t, exe(t, "ls", "--store", path, "--format", tc.format), 2, tc.want)
		})
	}
	wantFail(t, exe(t, "ls", "--store", path, "--format", "{{.Name}}", "-q"), 2, "-q writes names only; it does not go with a --format template")
}

// TestLsTableFitsTheTerminal: on a terminal (COLUMNS wide) the widest of
// NAME and PARENT are cut with an ellipsis so that every line fits; not on
// a terminal, whatever COLUMNS says.
func TestLsTableFitsTheTerminal(t *testing.T) {
	path := boltFixture(t)
	long := strings.Repeat("a-very-long-snapshot-name-", 4)
	ms, err := storage.NewBoltMetaStore(path)
	require.NoError(t, err)
	err = ms.WithTransaction(context.Background(), true, func(ctx context.Context) error {
		_, err := storage.CreateSnapshot(ctx, snapshots.KindActive, long, "layer-3")
		return err
	})
	require.NoError(t, errors.Join(err, ms.Close()))

	// Not a terminal: nothing is cut, COLUMNS or not.
	full := exe(t, "ls", "--store", path)
	require.Equal(t, 0, full.code, full.stderr)
	narrow := snapmeta(t, "", []string{"COLUMNS=40"}, "ls", "--store", path)
	assert.Equal(t, full.stdout, narrow.stdout)
	assert.Contains(t, narrow.stdout, long)

	var stdout bytes.Buffer
	old := isTerminal
	isTerminal = func(w io.Writer) bool { return w == io.Writer(&stdout) }
	t.Cleanup(func() { isTerminal = old })
	for _, tc := range []struct {
		name    string
		columns string
		args    []string
		fits    int // the width every line fits, 0: none cut
	}{
		{"table at 80", "80", nil, 80},
		{"table at 100", "100", nil, 100},
		{"wide enough", "400", nil, 0},
		{"template table at 60", "60", []string{"--format", `table {{.Name}}\t{{.Parent}}\t{{.ID}}`}, 60},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("COLUMNS", tc.columns)
			stdout.Reset()
			var stderr bytes.Buffer
			code := run(context.Background(), append([]string{"ls", "--store", path}, tc.args...), strings.NewReader(""), &stdout, &stderr)
			require.Equal(t, 0, code, stderr.String())
			out := stdout.String()
			if tc.fits == 0 {
				assert.Contains(t, out, long)
				assert.NotContains(t, out, "…")
				return
			}
			assert.Contains(t, out, "…")
			assert.NotContains(t, out, long)
			for _, line := range strings.Split(strings.TrimSuffix(out, "\n"), "\n") {
				assert.LessOrEqual(t, utf8.RuneCountInString(line), tc.fits, line)
			}
			assert.Contains(t, out, "layer-1", "short names are not cut")
		})
	}
}

// TestFitColumns cuts the widest shrinkable column first, never below
// minColumn.
func TestFitColumns(t *testing.T) {
	for _, tc := range []struct {
		name   string
		rows   [][]string
		width  int
		shrink []bool
		want   [][]string
	}{
		{"fits", [][]string{{"ab", "cd"}}, 6, nil, [][]string{{"ab", "cd"}}},
		{"widest first", [][]string{{"abcdefghijklmnop", "0123456789"}}, 24, nil, [][]string{{"abcdefghijk…", "0123456789"}}},
		{"both to fit", [][]string{{"abcdefghijklmnop", "0123456789ab"}}, 20, nil, [][]string{{"abcdefgh…", "01234567…"}}},
		{"only shrinkable", [][]string{{"abcdefghijklmnop", "0123456789ab"}}, 20, []bool{false, true}, [][]string{{"abcdefghijklmnop", "0123456…"}}},
		{"not below the minimum", [][]string{{"abcdefghijklmnop", "x"}}, 5, nil, [][]string{{"abcdefg…", "x"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fitColumns(tc.rows, tc.width, tc.shrink)
			assert.Equal(t, tc.want, tc.rows)
		})
	}
}

// TestInfoFormat: info takes --format json (as --json), table (the usual
// view) and templates with the parent chain and children too.
func TestInfoFormat(t *testing.T) {
	path := boltFixture(t)
	info := ok(t, "info", "--store", path, "layer-2")
	asJSON := ok(t, "info", "--store", path, "layer-2", "--json")
	for _, tc := range []struct {
		name string
		args []string
		env  []string
		want string
	}{
		{"json", []string{"--format", "json"}, nil, asJSON},
		{"table is the usual view", []string{"--format", "table"}, nil, info},
		{"template", []string{"--format", `{{.Name}} {{.ID}} {{join .ParentIDs ":"}} {{join .Children ","}}`}, nil, "layer-2 2 1 layer-3\n"},
		{"table template", []string{"--format", `table {{.Name}}\t{{.Kind}}\t{{.Children}}`}, nil, "NAME     KIND       CHILDREN\nlayer-2  committed  [layer-3]\n"},
		{"from the environment", nil, []string{"SNAPMETA_FORMAT={{.Parent}}"}, "layer-1\n"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := snapmeta(t, "", tc.env, append([]string{"info", "--store", path, "layer-2"}, tc.args...)...)
			require.Equal(t, 0, r.code, r.stderr)
			assert.Empty(t, r.stderr)
			assert.Equal(t, tc.want, r.stdout)
		})
	}
	wantFail(t, exe(t, "info", "--store", path, "layer-2", "--format", "{{.Nope}}"), 2, "can't evaluate field Nope")
	wantFail(t, exe(t, "info", "--store", path, "layer-2", "--format", "{{.Name}}", "--json"), 2, "--json and a --format template do not go together")
}
