PASSWORD="x"
login=web_app=None
