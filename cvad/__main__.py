from cvad.cli import app

app()
